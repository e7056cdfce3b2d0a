"""The benchmarks' baseline server computes the same recommendations as the product server,
only by slower means: the torch teacher scores what the ONNX teacher scores, exact retrieval
finds what the index finds (the tiny release's index is exact), and turning the caches off
changes no number. If these drift, a baseline ratio in bench/RESULTS.md compares different work."""
from __future__ import annotations

import numpy as np
import pytest

from bench.baseline_server import TORCH_TEACHER, register
from server import pipeline
from server.bootstrap import build_service
from server.errors import FailedPrecondition
from server.pipeline import Timer
from server.state import load_runtime, register_ranker


@pytest.fixture(scope="module")
def services(release_dir, small_sim, server_config):
    register()
    made = {
        "product": build_service(server_config(release_dir, small_sim)),
        "onnx_teacher": build_service(server_config(release_dir, small_sim, ranker="teacher_fp32")),
        "baseline": build_service(server_config(release_dir, small_sim, ranker=TORCH_TEACHER, retrieval="exact",
                                                 response_cache_ttl_s=0.0, feature_cache_ttl_s=0.0, item_frame_cache=False)),
    }
    yield made
    for svc in made.values():
        svc.cpu.shutdown()
        svc.io.shutdown()


def test_the_release_keeps_a_torch_teacher_that_scores_as_its_onnx_export(release_dir, small_sim, services):
    svc = services["product"]
    snap = svc.state.current
    now = svc.clock.now_ms()
    uf = snap.plan.decode(3, snap.plan.read_records(svc.store, 3, now), now)
    ids = snap.items.catalog.item_id
    rt = snap.runtime
    rc = None
    if rt.inputs.uses_retrieval:  # a ranker of candidate lists (every release now) reads the list's columns
        emb = rt.user_embeddings(pipeline.user_matrix(snap, uf), pipeline.user_history(uf, rt.history_len))
        hist = pipeline.user_history(uf, rt.item_item.history_len)[0] if rt.item_item is not None else None
        rc = pipeline.retrieval_columns(pipeline.candidate_scores(snap, emb, ids), ids, hist, rt.item_item)
    X = pipeline.feature_matrix(snap, uf, snap.items.rows(ids), now, None, rc)
    torch_scores = services["baseline"].state.current.runtime.score(X)
    onnx_scores = services["onnx_teacher"].state.current.runtime.score(X)
    assert torch_scores.shape == (len(X),)
    np.testing.assert_allclose(torch_scores, onnx_scores, atol=1e-4)
    assert not np.allclose(torch_scores, snap.runtime.score(X), atol=1e-3)  # the product ranks with the student


def test_the_baseline_recommends_what_the_product_recommends_with_the_teacher(services):
    base, teacher = services["baseline"], services["onnx_teacher"]
    now = base.clock.now_ms()
    checked = 0
    for user in range(0, 150, 17):
        ufs = [s.state.current.plan.decode(user, s.state.current.plan.read_records(s.store, user, now), now) for s in (base, teacher)]
        got = [pipeline.recommend(s.state.current, uf, np.empty(0, np.int64), 10, now, s.cfg, Timer()) for s, uf in zip((base, teacher), ufs)]
        (ranked_b, top_b), (ranked_t, top_t) = got
        assert len(top_b) == 10
        np.testing.assert_array_equal(ranked_b.ids, ranked_t.ids)
        np.testing.assert_allclose(ranked_b.scores, ranked_t.scores, atol=1e-4)
        np.testing.assert_array_equal(ranked_b.ids[top_b], ranked_t.ids[top_t])
        checked += 1
    assert checked >= 8


def test_exact_retrieval_finds_the_index_candidates(services):
    prod, base = services["product"], services["baseline"]
    snap = prod.state.current
    now = prod.clock.now_ms()
    for user in (0, 5, 77):
        uf = snap.plan.decode(user, snap.plan.read_records(prod.store, user, now), now)
        a = pipeline.retrieve(snap, uf, np.empty(0, np.int64), now, prod.cfg, Timer())
        b = pipeline.retrieve(snap, uf, np.empty(0, np.int64), now, base.cfg, Timer())
        np.testing.assert_array_equal(a.ids, b.ids)
    emb = snap.runtime.item_embeddings[:3]
    ids, scores = snap.runtime.retrieve_exact(emb, 5)
    assert ids.shape == (3, 5) and np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_allclose(scores, np.sort(emb @ snap.runtime.item_embeddings.T, axis=1)[:, ::-1][:, :5], rtol=1e-6)


def test_without_the_item_frame_cache_item_features_are_the_same(services):
    prod, base = services["product"], services["baseline"]
    now = prod.clock.now_ms()
    rows = np.array([0, 3, 7, 7, len(prod.state.current.items.catalog)])  # a repeat and the unknown row
    a = prod.state.current.items.features(rows, now)
    b = base.state.current.items.features(rows, now)
    assert not base.state.current.items._frames  # nothing was kept
    np.testing.assert_array_equal(a.missing, b.missing)
    np.testing.assert_allclose(a.values, b.values, equal_nan=True)


def test_an_unknown_ranker_is_refused_with_the_names_that_exist(release_dir, services):
    with pytest.raises(FailedPrecondition, match="torch_teacher"):
        load_runtime(release_dir, services["product"].sets_by_name, ranker="no_such_ranker")
    with pytest.raises(ValueError, match="release ranker"):
        register_ranker("student_int8", lambda release: None)
    with pytest.raises(ValueError, match="retrieval"):
        services["product"].cfg.with_(retrieval="hnsw")


def test_a_torch_checkpoint_that_is_not_a_ranker_is_refused(tmp_path):
    import torch

    from models.ranker import load_ranker

    torch.save({"kind": "teacher", "config": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a ranker checkpoint"):
        load_ranker(tmp_path / "x.pt")


def test_a_release_reading_more_history_than_the_server_keeps_is_refused(release_dir, services):
    sets = services["product"].sets_by_name
    rt = load_runtime(release_dir, sets)
    need = max(rt.history_len, rt.item_item.history_len if rt.item_item is not None else 0)  # the tower's and the item-item model's
    assert need > 1
    assert load_runtime(release_dir, sets, seen_cap=need).history_len == rt.history_len
    with pytest.raises(FailedPrecondition, match=f"last {need} engaged items.*keeps {need - 1}"):
        load_runtime(release_dir, sets, seen_cap=need - 1)


def test_the_serve_flags_for_comparisons_reach_the_config(release_dir, small_sim, capsys):
    import argparse

    from parity.cli_serve import add_serve_arguments, config_from_args

    p = argparse.ArgumentParser(prog="parity serve")
    add_serve_arguments(p)
    base = ["--release", str(release_dir), "--events", str(small_sim)]
    default = config_from_args(p.parse_args(base))
    assert (default.ranker, default.retrieval, default.item_frame_cache, default.response_cache_ttl_s > 0) == ("student_int8", "ann", True, True)
    cfg = config_from_args(p.parse_args(base + ["--ranker", "teacher_fp32", "--retrieval", "exact", "--no-caches"]))
    assert (cfg.ranker, cfg.retrieval, cfg.item_frame_cache, cfg.response_cache_ttl_s, cfg.feature_cache_ttl_s) == ("teacher_fp32", "exact", False, 0.0, 0.0)
    with pytest.raises(SystemExit):
        p.parse_args(base + ["--retrieval", "hnsw"])
    assert "--retrieval" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        p.parse_args(base + ["--drain-grace", "-1"])
    assert "--drain-grace must be a finite number >= 0" in capsys.readouterr().err


def test_the_hardening_flags_reach_the_config_or_are_refused_naming_the_option(release_dir, small_sim, monkeypatch):
    """What the README promises for --host, --metrics-host, --ops-port, tokens, --releases-root
    and the admission settings, through the real parser."""
    import argparse

    from parity.cli_serve import add_serve_arguments, config_from_args

    p = argparse.ArgumentParser(prog="parity serve")
    add_serve_arguments(p)
    base = ["--release", str(release_dir), "--events", str(small_sim)]
    monkeypatch.delenv("PARITY_INGEST_TOKEN", raising=False)
    monkeypatch.delenv("PARITY_ADMIN_TOKEN", raising=False)
    d = config_from_args(p.parse_args(base))
    assert (d.host, d.metrics_bind, d.ops_port, d.ingest_bearer, d.releases_dir) == ("127.0.0.1", "127.0.0.1", None, None, release_dir.parent)
    assert (d.core_pending_soft, d.core_pending_hard, d.serve_concurrency, d.serve_max_wait_s) == (24, 48, 1, 0.02)
    c = config_from_args(p.parse_args(base + ["--host", "0.0.0.0", "--ops-port", "0", "--admin-token", "A", "--ingest-token", "I",
                                              "--releases-root", "/srv/releases", "--core-pending", "4,8", "--serve-concurrency", "3",
                                              "--max-queue-wait-ms", "10"]))
    assert (c.host, c.metrics_bind, c.ops_port, c.ingest_bearer, str(c.releases_dir)) == ("0.0.0.0", "0.0.0.0", 0, "I", "/srv/releases")
    assert (c.core_pending_soft, c.core_pending_hard, c.serve_concurrency, c.serve_max_wait_s) == (4, 8, 3, 0.01)
    assert config_from_args(p.parse_args(base + ["--admin-token", "A"])).ingest_bearer == "A"  # no ingest token: the admin one
    monkeypatch.setenv("PARITY_INGEST_TOKEN", "E")
    assert config_from_args(p.parse_args(base + ["--metrics-host", "127.0.0.2"])).ingest_bearer == "E"
    assert config_from_args(p.parse_args(base + ["--store", "redis://127.0.0.1:1/0"])).serve_concurrency == 16  # 2 x io_threads
    for bad, words in ((["--core-pending", "8"], "--core-pending must be SOFT,HARD"), (["--core-pending", "9,3"], "core_pending_hard")):
        with pytest.raises(ValueError, match=words):
            config_from_args(p.parse_args(base + bad))
