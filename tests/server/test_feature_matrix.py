"""The server's ranker inputs, written a block at a time (the user's row, the item table's block
kept per as-of time, each pair table's block), are bit for bit the matrix `assemble` builds
from the same features given column by column, for known, new and unknown users and items,
prefetched and deferred pair sets, and a ranker that reads the candidate list's columns."""
from __future__ import annotations

import numpy as np
import pytest

from features.assemble import assemble, columns_from_frame
from server import pipeline
from server.bootstrap import build_service
from server.pipeline import Timer
from server.user_features import empty_pair_table


def _by_column(snap, uf, rows, now, extra=None, retrieval=None):
    """Every input as a named (values, missing) column, as the server assembled them before blocks."""
    spec = snap.runtime.inputs
    topic, creator, duration, publish = snap.items.content(rows)
    cols = dict(uf.columns)
    cols.update(retrieval or {})
    cols.update(columns_from_frame(spec.item_set, snap.items.features(rows, now), snap.items.layout.feature_set))
    by_col = {"topic": topic, "creator_id": creator}
    for fs, col in snap.plan.pair_sets:
        table = (extra or {}).get(fs.name) or uf.pairs.get(fs.name) or empty_pair_table(fs, now)
        cols.update(table.columns(by_col[col]))
    return assemble(spec, cols, item_topic=topic, item_publish_ts=publish, item_duration_s=duration, request_ts=now)


def _deferred(svc, snap, uf, rows, now):
    need = pipeline.missing_pair_values(snap, uf, rows)
    sets = {fs.name: fs for fs, _ in snap.plan.pair_sets}
    return {name: snap.plan.decode_pairs(sets[name], vals, svc.store.get_many(snap.plan.pair_state_keys(sets[name], uf.user_id, vals)), now)
            for name, vals in need.items()}


def _same(a, b):
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    assert np.array_equal(a.view(np.int32), b.view(np.int32))


@pytest.fixture(scope="module")
def services(release_dir, small_sim, server_config):
    made = {"prefetched": build_service(server_config(release_dir, small_sim)),
            "deferred": build_service(server_config(release_dir, small_sim, pair_prefetch_limit=0)),
            "no_frame_cache": build_service(server_config(release_dir, small_sim, item_frame_cache=False))}
    yield made
    for svc in made.values():
        svc.cpu.shutdown()
        svc.io.shutdown()


@pytest.mark.parametrize("kind", ["prefetched", "deferred", "no_frame_cache"])
def test_block_assembly_equals_column_assembly_bit_for_bit(services, kind):
    svc = services[kind]
    snap = svc.state.current
    now = svc.clock.now_ms()
    cat = snap.items.catalog.item_id
    for user in (0, 3, 17, 2_000_000):  # the last one is new: no records at all
        uf = snap.plan.decode(user, snap.plan.read_records(svc.store, user, now), now)
        cand = pipeline.retrieve(snap, uf, np.empty(0, np.int64), now, svc.cfg, Timer())
        rt = snap.runtime
        hist = pipeline.user_history(uf, rt.item_item.history_len)[0] if rt.item_item is not None else None
        for ids in (cand.ids, cat, np.array([cat[0], 10**9, cat[-1], cat[0]])):  # an unknown item and a repeat
            rows = snap.items.rows(ids)
            extra = _deferred(svc, snap, uf, rows, now) if snap.plan.deferred else None
            rc = (pipeline.retrieval_columns(pipeline.candidate_scores(snap, cand.user_emb, ids), ids, hist, rt.item_item)
                  if rt.inputs.uses_retrieval else None)  # a ranker of candidate lists reads the list's columns too
            for t in (now, now + 3_600_000):
                _same(pipeline.feature_matrix(snap, uf, rows, t, extra, rc), _by_column(snap, uf, rows, t, extra, rc))


def test_the_user_towers_row_is_the_users_columns_nan_where_missing(services):
    svc = services["prefetched"]
    snap = svc.state.current
    now = svc.clock.now_ms()
    for user in (3, 2_000_000):
        uf = snap.plan.decode(user, snap.plan.read_records(svc.store, user, now), now)
        want = [np.nan if uf.columns[c][1][0] else uf.columns[c][0][0] for c in snap.runtime.user_columns]
        got = pipeline.user_matrix(snap, uf)
        assert got.shape == (1, len(want)) and got.dtype == np.float32 and got.flags.c_contiguous
        assert np.array_equal(got[0].view(np.int32), np.asarray(want, dtype=np.float32).view(np.int32))


def test_with_retrieval_columns_block_assembly_equals_column_assembly(small_sim, server_config, tmp_path_factory):
    from pipeline.train import train_release

    rel = train_release(small_sim, tmp_path_factory.mktemp("cand-releases"), profile="tiny", seed=0, ranker_rows="candidates")
    svc = build_service(server_config(rel.path, small_sim))
    try:
        snap = svc.state.current
        rt = snap.runtime
        assert rt.inputs.uses_retrieval
        now = svc.clock.now_ms()
        for user in (3, 17):
            uf = snap.plan.decode(user, snap.plan.read_records(svc.store, user, now), now)
            cand = pipeline.retrieve(snap, uf, np.empty(0, np.int64), now, svc.cfg, Timer())
            hist = pipeline.user_history(uf, rt.item_item.history_len)[0] if rt.item_item is not None else None
            rc = pipeline.retrieval_columns(pipeline.candidate_scores(snap, cand.user_emb, cand.ids), cand.ids, hist, rt.item_item)
            _same(pipeline.feature_matrix(snap, uf, cand.rows, now, None, rc), _by_column(snap, uf, cand.rows, now, None, rc))
    finally:
        svc.cpu.shutdown()
        svc.io.shutdown()


def test_a_pair_table_covers_keys_exactly_when_isin_says_so(services):
    snap = services["prefetched"].state.current
    fs = snap.plan.pair_sets[0][0]
    rng = np.random.default_rng(0)
    for n in (0, 1, 5, 40):
        table = empty_pair_table(fs, 0)
        table = type(table)(fs, np.unique(rng.integers(0, 60, n)).astype(np.int64), table.frame)
        for _ in range(50):
            keys = rng.integers(-3, 70, rng.integers(0, 12))
            k = keys[keys >= 0]
            assert table.covers(keys) == bool(np.isin(k, table.values).all())
