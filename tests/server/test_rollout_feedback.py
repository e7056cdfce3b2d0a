"""Feedback reaches the canary guard of the rollout that served the item, in the arm that
served it: never the next rollout's guard, never re-split by another salt."""
from __future__ import annotations

import time

import pytest

from server.app import BackgroundServer
from server.client import LiveEvent, ParityClient
from server.rollout import RolloutSpec


@pytest.fixture
def served(release_dir, small_sim, tmp_path, writable_copy, server_config, admin_token):
    root = tmp_path / "releases"
    root.mkdir()
    primary = writable_copy(release_dir, root / release_dir.name)
    canary = writable_copy(release_dir, root / "canary")
    cfg = server_config(primary, small_sim, drift_interval_s=0, guard_interval_s=3600.0, ingest_max_per_item=0, ingest_max_per_user=0,
                        response_cache_ttl_s=0.0)
    with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=10.0, admin_token=admin_token) as c:
        yield s, c, canary


def _feedback(c, s, answers, base=7_000_000):
    now = s.service.clock.now_ms()
    events = []
    for n, r in enumerate(answers):
        item = r.items[0].item_id
        events += [LiveEvent(base + 2 * n, now + 1, r.user, item, "impression", 1.0, request_id=r.request_id),
                   LiveEvent(base + 1 + 2 * n, now + 2, r.user, item, "play", 5.0, request_id=r.request_id)]
    assert c.ingest(events).accepted == len(events)


def _wait_feedback(s, total, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        snap = s.service.rollouts.guard.snapshot(s.service.clock.now_ms())
        if sum(a.feedback_requests for a in snap.values()) >= total:
            return snap
        time.sleep(0.05)
    return s.service.rollouts.guard.snapshot(s.service.clock.now_ms())


def test_feedback_is_credited_to_the_arm_that_served_and_not_to_a_later_rollout(served):
    s, c, canary = served
    s.run(s.service.set_rollout(RolloutSpec(canary=str(canary), canary_percent=40.0, salt="A")))
    answers = []
    for u in range(1, 61):
        r = c.recommend(u, k=5)
        answers.append(type("A", (), {"user": u, "request_id": r.request_id, "items": r.items, "arm": r.arm})())
    by_arm = {a: sum(1 for r in answers if r.arm == a) for a in ("primary", "canary")}
    assert by_arm["canary"] > 0 and by_arm["primary"] > 0
    _feedback(c, s, answers)
    snap = _wait_feedback(s, 60)
    assert {a: snap[a].feedback_requests for a in ("primary", "canary")} == by_arm
    s.service.rollouts._record_feedback(*_resend(s, answers))  # a redelivery of the same events counts once
    snap = s.service.rollouts.guard.snapshot(s.service.clock.now_ms())
    assert {a: snap[a].feedback_requests for a in ("primary", "canary")} == by_arm
    # a new rollout (another salt) starts from nothing: late feedback of the old one is not its business
    s.run(s.service.set_rollout(RolloutSpec(canary=str(canary), canary_percent=40.0, salt="B")))
    _feedback(c, s, answers, base=8_000_000)
    time.sleep(0.5)
    snap = s.service.rollouts.guard.snapshot(s.service.clock.now_ms())
    assert snap["primary"].feedback_requests == 0 and snap["canary"].feedback_requests == 0


def _resend(s, answers):
    from features.events import EventBatch, EventType

    rows = [{"event_id": 7_000_000 + 2 * n, "ts": 0, "user_id": r.user, "item_id": int(r.items[0].item_id), "type": EventType.IMPRESSION,
             "value": 1.0} for n, r in enumerate(answers)]
    return EventBatch.from_rows(rows), [r.request_id for r in answers]
