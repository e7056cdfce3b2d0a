"""The item table's whole-catalogue frame, kept across as-of times as served-values records, is
`read_features` of every item state, bit for bit, at any as-of time: inside and past the
records' exact intervals, across tile boundaries and the TTL, and back in time."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from features.datasets import load_info
from features.eventlog import EventLog
from features.events import MS_PER_HOUR, MS_PER_MINUTE
from features.materialize import materialize
from features.online.memory import MemoryStore
from features.repo import feature_sets
from features.state import read_features
from server.items import load_catalog, load_item_table


@pytest.fixture(scope="module")
def item_table(small_sim):
    info = load_info(small_sim)
    sets = {fs.name: fs for fs in feature_sets(info.kind, info.n_topics)}
    store = MemoryStore("items-test")
    log = EventLog(small_sim / "events")
    end = int(log.max_ts()) + 1
    materialize(log, store, [sets["item_popularity"]], until_ts=end)
    table = load_item_table(store, sets["item_popularity"], load_catalog(small_sim))
    return table, end


def _as_of_times(end: int, ttl_ms: int) -> list[int]:
    ts = [end, end + 1]
    for k in range(1, 4 * 24 * 4):  # every 15 min tile boundary for 4 days, and 1 ms either side
        b = (end // (15 * MS_PER_MINUTE) + k) * 15 * MS_PER_MINUTE
        ts += [b - 1, b, b + 1]
    ts += [end + ttl_ms - 1, end + ttl_ms, end + ttl_ms + 1, end + ttl_ms + 3 * MS_PER_HOUR]
    ts += [end + 7, end + 30 * MS_PER_MINUTE, end + 5 * MS_PER_HOUR]  # back in time after the records were rewritten later
    return ts


def test_the_catalogue_frame_equals_read_features_of_every_state_at_any_as_of_time(item_table):
    table, end = item_table
    assert table.found.any() and (table.states["feature_ts"] < 0).any()  # live items and empty states (the unknown row)
    rows = np.arange(len(table.states))
    answered = 0
    for t in _as_of_times(end, table.layout.feature_set.ttl_ms):
        got = table.features(rows, t)
        want = read_features(table.layout, table.states, t)
        assert np.array_equal(got.values.view(np.int64), want.values.view(np.int64)), t
        assert np.array_equal(got.missing, want.missing), t
        assert np.array_equal(got.feature_ts, want.feature_ts), t
        answered += int((~want.missing).any(axis=1).sum())
    assert answered > 0


def test_a_new_as_of_time_reads_the_states_of_only_the_items_whose_records_cannot_answer(item_table, monkeypatch):
    import server.items as items_mod

    table, end = item_table
    rows = np.arange(len(table.states))
    table.features(rows, end + 2 * MS_PER_HOUR)  # records as of then
    read_rows = []
    real = items_mod.read_features
    monkeypatch.setattr(items_mod, "read_features", lambda lay, st, t: read_rows.append(len(st)) or real(lay, st, t))
    table.features(rows, end + 2 * MS_PER_HOUR + 100)  # the next as-of tick: every record still answers
    assert read_rows == []


def test_a_refreshed_table_keeps_the_records_of_unchanged_items_and_rereads_the_changed_ones(item_table):
    import server.items as items_mod

    table, end = item_table
    t = end + 3 * MS_PER_HOUR
    rows = np.arange(len(table.states))
    table.features(rows, t)
    states = table.states.copy()
    live = np.flatnonzero(states["feature_ts"] >= 0)
    changed = live[:3]
    ring = table.layout.rings[0].field
    states[f"{ring}_count"][changed] += 1  # a few items got events (same feature_ts: only the state bytes tell)
    fresh = replace(table, states=states, _frames={}, _values={})
    fresh.keep_records_of(table)
    recs, kind = fresh._values["records"]
    old_recs, old_kind = table._values["records"]
    assert (kind[changed] == items_mod._UNWRITTEN).all()
    assert (kind[live[3:]] == old_kind[live[3:]]).all() and (old_kind[live[3:]] == items_mod._RECORD).all()
    assert recs[live[3:]].tobytes() == old_recs[live[3:]].tobytes()
    got = fresh.features(rows, t + 100)
    want = read_features(fresh.layout, states, t + 100)
    assert np.array_equal(got.values.view(np.int64), want.values.view(np.int64))
    assert np.array_equal(got.missing, want.missing) and np.array_equal(got.feature_ts, want.feature_ts)


def test_content_gives_the_catalogues_columns_and_the_unknown_values_for_the_unknown_row(item_table):
    table, _ = item_table
    c = table.catalog
    rows = table.rows(np.array([c.item_id[3], 10**12, c.item_id[0], c.item_id[3]]))
    topic, creator, duration, publish = table.content(rows)
    assert topic.tolist() == [c.topic[3], -1, c.topic[0], c.topic[3]] and topic.dtype == np.int64
    assert creator.tolist() == [c.creator_id[3], -1, c.creator_id[0], c.creator_id[3]] and creator.dtype == np.int64
    assert duration.tolist() == [c.duration_s[3], 0.0, c.duration_s[0], c.duration_s[3]] and duration.dtype == np.float64
    assert publish.tolist() == [c.publish_ts[3], 0, c.publish_ts[0], c.publish_ts[3]] and publish.dtype == np.int64
    empty = load_item_table(None, table.layout.feature_set, replace(c, **{f: getattr(c, f)[:0] for f in ("item_id", "topic", "creator_id",
                                                                                                        "duration_s", "publish_ts")}))
    assert [x.tolist() for x in empty.content(empty.rows(np.array([5, 6])))] == [[-1, -1], [-1, -1], [0.0, 0.0], [0, 0]]
