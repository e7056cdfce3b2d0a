"""The store-fault policy as pure functions (server/records.py): the request path calls them
and so does the backtest, so both decide the same way."""
from __future__ import annotations

from server.records import (
    COMPUTE_RESERVE_S,
    STORE_TIMEOUT,
    RecordRead,
    fallback_read,
    store_wait_s,
)


def test_a_store_read_waits_for_the_store_budget_but_never_eats_the_ranking_reserve():
    assert store_wait_s(0.15, 1.0) == 0.15
    assert store_wait_s(0.15, 0.1) == 0.1 - COMPUTE_RESERVE_S
    assert store_wait_s(0.15, 0.0) == 0.001  # a spent deadline still tries for a millisecond


def test_a_read_the_store_did_not_answer_serves_the_last_good_records_or_defaults():
    assert fallback_read(None, STORE_TIMEOUT) == RecordRead(None, "default", STORE_TIMEOUT)
    assert fallback_read([b"x"], STORE_TIMEOUT) == RecordRead([b"x"], "stale", STORE_TIMEOUT)
    assert fallback_read(None, STORE_TIMEOUT, lost="store_lost_data").reason == "store_lost_data"
