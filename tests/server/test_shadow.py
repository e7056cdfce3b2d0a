"""Shadow requests: run after the answer, never change it, and measure the shadow release
against the primary (an identical copy agrees perfectly); a share shadows that share."""
from __future__ import annotations

import shutil
import time

import pytest

from server.app import BackgroundServer
from server.client import ParityClient
from server.rollout import RolloutSpec


@pytest.fixture
def releases(release_dir, tmp_path, writable_copy):
    root = tmp_path / "releases"
    root.mkdir()
    primary = writable_copy(release_dir, root / release_dir.name)
    shutil.copytree(primary, root / "shadow-copy")
    return primary, root / "shadow-copy"


def _wait(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_a_shadow_never_changes_an_answer_and_an_identical_copy_agrees(releases, small_sim, server_config, admin_token):
    primary, shadow = releases
    cfg = server_config(primary, small_sim, drift_interval_s=0, response_cache_ttl_s=0.0, shadow_cpu_share=1.0)
    with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=10.0, admin_token=admin_token) as c:
        before = {u: c.recommend(u, k=5) for u in range(1, 21)}
        st = s.run(s.service.set_rollout(RolloutSpec(shadow=str(shadow), shadow_percent=100.0, salt="t")))
        assert st["state"] == "canary" and st["shadow_release_id"] == str(shadow)
        after = {u: c.recommend(u, k=5) for u in range(1, 21)}
        for u in before:
            assert after[u].arm == "primary" and after[u].release_id == before[u].release_id
            assert [(i.item_id, i.score) for i in after[u].items] == [(i.item_id, i.score) for i in before[u].items]
        assert _wait(lambda: s.service.shadow.stats.requests >= 20)
        m = s.service.rollout_status()["shadow"]
        assert m["requests"] == 20 and m["errors"] == 0 and m["dropped"] == 0
        assert m["top_k_overlap"] == 1.0 and m["score_rank_correlation"] == pytest.approx(1.0)
        assert m["latency_p99_ms"] > 0


def test_a_shadow_share_shadows_about_that_share_of_requests(releases, small_sim, server_config, admin_token):
    primary, shadow = releases
    cfg = server_config(primary, small_sim, drift_interval_s=0, shadow_cpu_share=1.0)
    with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=10.0, admin_token=admin_token) as c:
        s.run(s.service.set_rollout(RolloutSpec(shadow=str(shadow), shadow_percent=50.0, salt="half")))
        for u in range(1, 201):
            c.recommend(u, k=10)
        assert _wait(lambda: s.service.shadow.stats.requests > 0 and not s.service.shadow._q)
        m = s.service.rollout_status()["shadow"]
        assert 60 <= m["requests"] <= 140  # about half of the requests are shadowed
        assert m["requests"] + m["dropped"] < 200


def test_shadow_work_stays_within_its_share_of_each_second_and_the_rest_is_dropped(releases, small_sim, server_config, admin_token):
    primary, shadow = releases
    cfg = server_config(primary, small_sim, drift_interval_s=0, response_cache_ttl_s=0.0, shadow_cpu_share=0.01)  # 10 ms a second
    with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=10.0, admin_token=admin_token) as c:
        s.run(s.service.set_rollout(RolloutSpec(shadow=str(shadow), shadow_percent=100.0, salt="t")))
        t0 = time.monotonic()
        for u in range(1, 151):
            c.recommend(u, k=5)
        st = s.service.shadow.stats
        assert _wait(lambda: st.requests + st.dropped == 150)
        started = int(time.monotonic()) - int(t0) + 1  # budget windows are whole monotonic seconds
        m = s.service.rollout_status()["shadow"]
        assert m["requests"] + m["dropped"] == 150 and m["dropped"] > 0
        assert m["requests"] >= 1  # the budget admits work, it does not starve the shadow
        # the budget is checked before a job starts, so each second may overrun it by at most one job
        assert st.busy_s <= started * (0.01 + st.max_job_s) + 1e-9
