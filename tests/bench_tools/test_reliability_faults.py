"""The fault benchmark's harness (bench/reliability_faults.py), small: its lost / double-counted
estimator is exact on counts, and two scenarios run end to end on a private redis-server with a
few hundred events: poison messages are dead-lettered exactly and the good ones applied once, and
events resent after a kill -9 of the server are applied exactly once."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.reliability_faults import FaultsConfig, LoadRecords, Workspace, lost_and_double, poison_messages, server_kill9_during_ingest

TINY = FaultsConfig(qps=20.0, live_users=300, kill_events=600, ingest_batch=100, poison_good=300, poison_bad=60, consumer_idle_exit_s=2.0)


@pytest.fixture
def workspace(small_sim: Path, release_dir: Path, tmp_path: Path) -> Workspace:
    return Workspace(small_sim, release_dir, tmp_path)


def test_the_estimator_counts_each_missing_and_each_extra_event_once() -> None:
    reference = np.array([[3, 1, 0, 2], [5, 0, 1, 0]])  # per user: impressions, plays, likes, skips (7-day counts)
    store = np.array([[2, 1, 0, 4], [5, 0, 0, 0]])  # one impression and one like missing; two skips applied twice
    assert lost_and_double(reference, store) == (2, 2)
    assert lost_and_double(reference, reference) == (0, 0)
    assert lost_and_double(reference.astype(float), reference + 1e-9) == (0, 0)  # float reads of exact counts


def test_load_records_split_by_due_time_and_count_what_clients_saw() -> None:
    rec = LoadRecords(due=np.array([0.0, 1.0, 2.0, 3.0]), latency_ms=np.array([5.0, np.nan, 7.0, 9.0]),
                      code=np.array(["OK", "UNAVAILABLE", "OK", "OK"], dtype=object), degraded=np.array([False, False, True, False]))
    assert (rec.failed, rec.n_degraded) == (1, 1)
    assert rec.codes() == {"OK": 3, "UNAVAILABLE": 1}
    assert rec.last_bad() == 2.0
    assert len(rec.window(1.0, 3.0)) == 2 and rec.window(t1=1.0).failed == 0


@pytest.mark.redis
def test_poison_messages_are_dead_lettered_exactly_and_the_good_ones_applied_once(workspace: Workspace) -> None:
    row = poison_messages(workspace, TINY)
    assert row.facts["consumer_exit"] == 0
    assert row.facts["dead_lettered"] == TINY.poison_bad and row.facts["dead_letters_exact"]
    assert row.facts["accepted"] == TINY.poison_good and row.facts["pending"] == 0
    assert (row.events_lost, row.events_double_counted) == (0, 0)
    assert row.facts["values_mismatched"] == 0
    assert row.requests > 0 and row.requests_failed == 0  # the background load ran against the server beside the consumer


@pytest.mark.redis
def test_events_resent_after_the_server_is_killed_are_applied_exactly_once(workspace: Workspace) -> None:
    row = server_kill9_during_ingest(workspace, TINY)
    assert row.facts["resend_complete"]
    assert 0 < row.facts["acked_before_kill"] < TINY.kill_events // TINY.ingest_batch
    accepted, duplicates, late, invalid, limited = row.facts["resend_totals"]
    assert (late, invalid, limited) == (0, 0, 0) and accepted + duplicates == TINY.kill_events
    assert (row.events_lost, row.events_double_counted) == (0, 0)
    assert row.facts["values_mismatched"] == 0
    assert set(row.to_json()) == {"fault", "scenario", "requests", "requests_failed", "requests_degraded", "events_sent", "events_lost",
                                  "events_double_counted", "seconds", "notes"}
