"""A release's ranking order (manifest ranking.order): the int8 ranker's, or the item-item
model's score of the user's history, chosen on validation lists and served as chosen."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from export.manifest import ManifestError, ReleaseManifest
from export.runtime import ReleaseRuntime, ordered_scores


def test_the_item_item_order_puts_scored_rows_above_the_rest_in_their_own_order():
    p = np.array([0.9, 0.1, 0.5, 0.7, 0.2], dtype=np.float32)
    ii = np.array([0.3, 2.0, np.nan, -1.5, 0.31])
    s = ordered_scores(p, ii, "item_item")
    assert s.dtype == np.float32
    assert np.array_equal(np.argsort(-s, kind="stable"), [1, 4, 0, 3, 2])  # by item-item, then the ranker's 0.5 below
    assert (s[np.isfinite(ii)] > 1).all() and s[2] == np.float32(0.5)
    assert np.array_equal(ordered_scores(p, ii, "ranker"), p)
    assert np.isfinite(ordered_scores(p, np.array([1e6, -1e6, 0, 0, 0]), "item_item")).all()  # no overflow to NaN
    with pytest.raises(ValueError, match="order"):
        ordered_scores(p, ii, "popularity")


def _manifest(release_dir, **ranking):
    m = json.loads((release_dir / "manifest.json").read_text())
    if ranking:
        m["ranking"] = ranking
    return m


def test_a_manifest_names_a_known_order_the_inputs_can_give(release_dir):
    assert ReleaseManifest.parse(_manifest(release_dir)).order == "ranker"
    assert ReleaseManifest.parse(_manifest(release_dir, order="item_item")).order == "item_item"
    with pytest.raises(ManifestError, match="ranking.order"):
        ReleaseManifest.parse(_manifest(release_dir, order="popularity"))
    m = _manifest(release_dir, order="item_item")
    m["ranker_inputs"]["columns"] = [c for c in m["ranker_inputs"]["columns"] if c != "retrieval.item_item"]
    with pytest.raises(ManifestError, match="no retrieval.item_item"):
        ReleaseManifest.parse(m)


@pytest.fixture(scope="module")
def item_item_release(small_sim, tmp_path_factory):
    from pipeline.train import train_release

    return train_release(small_sim, tmp_path_factory.mktemp("order"), profile="tiny", seed=0, overrides={"final_order": "item_item"})


def test_a_release_ordered_by_item_item_is_served_in_that_order(item_item_release, small_sim):
    """The server's own request path (in process): a user with a history gets the candidates with
    an item-item score first, best first, each score the item-item score mapped into (1, 2)."""
    from features.eventlog import EventLog
    from parity_api.v1 import recommender_pb2 as pb
    from server.bootstrap import build_service
    from server.config import ServerConfig
    from server.validation import validate_recommend

    r = item_item_release.manifest["ranking"]
    assert r["order"] == "item_item" and r["item_item_refit"]["positives"] > 0  # refitted on every split's positives
    assert r["item_item_refit"]["weights"] == item_item_release.manifest["retrieval"]["item_item"]["weights"]  # the one saved
    rt = ReleaseRuntime.load(item_item_release)
    assert rt.order == "item_item"
    ev = EventLog(small_sim / "events").read()
    users, counts = np.unique(ev.user_id, return_counts=True)
    user = int(users[np.argmax(counts)])
    svc = build_service(ServerConfig(release=item_item_release.path, data_dir=small_sim, host="127.0.0.1", port=0, metrics_port=None))
    loop = asyncio.new_event_loop()
    try:
        out = loop.run_until_complete(svc.recommend(validate_recommend(pb.RecommendRequest(user_id=str(user), k=10), svc.cfg)))
    finally:
        loop.close()
        svc.cpu.shutdown()
        svc.io.shutdown()
    scores = np.array([score for _, score, _ in out.items])
    assert len(scores) == 10 and not out.degraded
    assert (np.diff(scores) <= 0).all() and (scores > 1).all()  # the heavy user's top 10 all scored by item-item


def test_a_release_chooses_its_order_on_the_validation_lists(small_sim, tmp_path):
    from pipeline.train import train_release

    rel = train_release(small_sim, tmp_path, profile="tiny", seed=0, overrides={"final_order": "valid"})
    r = rel.manifest["ranking"]
    ch = r["choice"]
    assert set(ch["valid_ndcg@10"]) == {"item_item", "ranker"} and ch["lists"] > 0
    assert r["order"] == ("item_item" if ch["paired_diff"] > 0 else "ranker") == ReleaseRuntime.load(rel).order
    assert rel.manifest["config"]["final_order"] == "valid"
    with pytest.raises(ValueError, match="final_order"):
        train_release(small_sim, tmp_path, profile="tiny", seed=0, overrides={"final_order": "best"})


def test_eval_measures_the_order_the_release_serves(item_item_release, small_sim):
    from pipeline.evaluate import evaluate_release

    res = evaluate_release(item_item_release.path, small_sim)
    assert set(res.two_stage) == {"popularity", "two_tower", "teacher_fp32", "student_fp32", "student_int8", "release_order"}
    assert 0 <= res.two_stage["release_order"]["ndcg@10"] <= 1


def test_an_item_item_release_runs_the_ranker_only_on_the_rows_it_falls_back_on(item_item_release):
    rt = ReleaseRuntime.load(item_item_release)
    cols = rt.inputs.columns
    X = np.random.default_rng(0).random((50, len(cols))).astype(np.float32)
    col = cols.index("retrieval.item_item")
    X[[3, 17], col] = np.nan  # two rows without an item-item score
    full = ordered_scores(rt.score(X, "student_int8"), X[:, col], "item_item")
    seen = []
    real = rt.score
    rt.score = lambda Xs, ranker=None: seen.append(len(Xs)) or real(Xs, ranker)
    assert np.array_equal(rt.final_scores(X, "student_int8"), full)  # the same scores, row by row
    assert seen == [2]
    X[[3, 17], col] = 0.5
    rt.final_scores(X, "student_int8")
    assert seen == [2]  # every row scored by item-item: the ranker not run at all
