"""`parity train` end to end on tiny data: a checked, reproducible release that eval reads."""
from __future__ import annotations

import json

import numpy as np
import pytest

from export.release import ReleaseError
from export.runtime import ReleaseRuntime
from features.repo import feature_sets
from models.data import Split, build_training_data
from pipeline.evaluate import evaluate_release, topk_metrics
from pipeline.train import train_release


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory, small_sim):
    root = tmp_path_factory.mktemp("releases")
    return train_release(small_sim, root, profile="tiny", seed=0)


def test_the_release_holds_every_artifact_and_names_its_feature_set_versions(tiny_release, small_sim):
    m = tiny_release.manifest
    files = set(m["files"])
    assert {"rankers/teacher_fp32.onnx", "rankers/student_fp32.onnx", "rankers/student_int8.onnx", "retrieval/user_tower.onnx",
            "retrieval/item_tower.onnx", "retrieval/item_ids.npy", "retrieval/item_embeddings.npy", "popularity.json"} <= files
    assert any(f.startswith("retrieval/index/") for f in files)
    want = {fs.name: fs.version for fs in feature_sets("simulated", 20)}
    assert m["feature_sets"] and all(want[n] == v["version"] for n, v in m["feature_sets"].items())
    assert m["training_data"]["fingerprint"] and m["seed"] == 0 and m["libraries"]["onnxruntime"]
    assert set(m["reference"]["features"]) == set(m["ranker_inputs"]["columns"])
    assert m["metrics"]["retrieval"]["ann_recall@100_vs_exact"] >= 0.95
    assert m["metrics"]["quantization"]["mean_tau"] >= 0.95


def test_the_release_serves_through_the_runtime_with_int8_close_to_fp32(tiny_release, small_sim):
    rt = ReleaseRuntime.load(tiny_release)
    td = build_training_data(small_sim, seed=0, max_rows=20_000)
    # the rankers read the labelled inputs (the trend inputs if validation kept them) plus the list-relative
    # retrieval columns (models/candidates.py)
    kept = [c for c in td.columns if c in rt.inputs.columns]
    assert {c for c in td.columns if c not in kept} in (set(), {c for c in td.columns if c.startswith("trend.")})
    assert list(rt.inputs.columns[: len(kept)]) == kept and len(rt.inputs.columns) == len(kept) + 3
    rng = np.random.default_rng(0)
    extra = np.stack([rng.integers(0, 200, 200), -rng.random(200), rng.normal(size=200)], axis=1)
    Xv = td.valid.X[:200][:, [td.columns.index(c) for c in kept]]
    X = np.concatenate([Xv, extra], axis=1).astype(np.float32)
    a, b = rt.score(X, "student_fp32"), rt.score(X, "student_int8")
    assert np.all((a >= 0) & (a <= 1)) and np.corrcoef(a, b)[0, 1] > 0.98
    emb = rt.user_embeddings(rt.user_inputs(Xv))
    ids, _ = rt.retrieve(emb, 10)
    assert ids.shape == (200, 10) and set(ids.ravel().tolist()) <= set(rt.vocab.tolist())
    nan_user = rt.user_embeddings(np.full((1, len(rt.user_columns)), np.nan, dtype=np.float32))
    assert np.isfinite(nan_user).all()


def test_same_events_config_and_seed_give_the_same_fingerprint_and_metrics(tiny_release, small_sim, tmp_path):
    again = train_release(small_sim, tmp_path, profile="tiny", seed=0)
    assert again.manifest["training_data"] == tiny_release.manifest["training_data"]
    assert again.manifest["metrics"]["ranking_test"] == tiny_release.manifest["metrics"]["ranking_test"]
    assert again.manifest["metrics"]["retrieval"] == tiny_release.manifest["metrics"]["retrieval"]


def test_no_training_row_uses_features_from_its_future(small_sim):
    """Recompute a few rows with the log cut at the row's time: identical inputs."""
    from features.pit import PitJoiner
    from models.data import feature_matrix

    td = build_training_data(small_sim, seed=0)
    used = list(td.sets)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(td.test), 5, replace=False):
        s = td.test
        past = td.events.take(np.flatnonzero(td.events.ts < s.ts[i]))
        x = feature_matrix(td.inputs, PitJoiner(used, past), used, td.items, s.user_id[i : i + 1], s.item_id[i : i + 1], s.ts[i : i + 1])
        np.testing.assert_allclose(x[0], s.X[i], rtol=1e-6, atol=1e-6, equal_nan=True)


def test_eval_reads_the_release_and_reports_every_model(tiny_release, small_sim):
    res = evaluate_release(tiny_release.path, small_sim)
    assert set(res.two_stage) == {"popularity", "two_tower", "teacher_fp32", "student_fp32", "student_int8"}
    assert res.users > 0 and all(0 <= v["ndcg@10"] <= 1 for v in res.two_stage.values())
    assert res.sizes["student_int8"] < res.sizes["student_fp32"]
    json.dumps(res.summary())


def test_the_rankers_are_refitted_on_the_validation_lists_for_the_epochs_chosen_there(tiny_release):
    m = tiny_release.manifest
    refit = m["metrics"]["ranker_refit"]
    assert m["config"]["refit_ranker"] is True and refit["teacher_epochs"] >= 1 and refit["student_epochs"] >= 1
    rows = m["training_data"]["ranker_rows"]
    assert refit["rows"] == rows["train"] + rows["valid"]  # the training lists and the validation lists


def test_the_trend_inputs_are_kept_only_when_they_raise_the_validation_ndcg(tiny_release):
    from pipeline.train import _valid_ndcg_choice

    m = tiny_release.manifest
    choice = m["metrics"]["trend_choice"]
    has = any(c.startswith("trend.") for c in m["ranker_inputs"]["columns"])
    assert m["config"]["trend_features"] == "valid" and has == choice["kept"] == (choice["paired_diff"] > 0)
    # a fixed validation input: two users' lists; with the trends the first list's positive is ranked first
    valid = Split("valid", np.array([1, 1, 1, 2, 2, 2]), np.arange(6), np.zeros(6, np.int64), np.array([1, 0, 0, 0, 1, 0], np.float32),
                  np.zeros((6, 1), np.float32), np.zeros((6, 0), np.int64))
    better = np.array([0.9, 0.1, 0.2, 0.3, 0.5, 0.1])
    worse = np.array([0.1, 0.9, 0.2, 0.3, 0.5, 0.1])
    got = _valid_ndcg_choice(valid, better, worse)
    assert got["kept"] and got["lists"] == 2 and got["paired_diff"] == pytest.approx((1.0 - 1.0 / np.log2(4)) / 2)
    assert not _valid_ndcg_choice(valid, worse, better)["kept"]
    assert not _valid_ndcg_choice(valid, better, better)["kept"]  # no gain: dropped


def test_eval_measures_the_validation_slice_the_same_way(tiny_release, small_sim):
    test, valid = evaluate_release(tiny_release.path, small_sim), evaluate_release(tiny_release.path, small_sim, part="valid")
    assert set(valid.two_stage) == set(test.two_stage) and valid.users > 0
    assert valid.two_stage["popularity"] != test.two_stage["popularity"]  # other users, other cut
    with pytest.raises(ValueError, match="part"):
        evaluate_release(tiny_release.path, small_sim, part="train")


def test_eval_refuses_a_release_trained_on_other_feature_versions(tiny_release, tmp_path, small_sim):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_release.path, bad)
    mp = bad / "manifest.json"
    mp.chmod(0o644)
    m = json.loads(mp.read_text())
    name = next(iter(m["feature_sets"]))
    m["feature_sets"][name]["version"] = "v000000000000"
    mp.write_text(json.dumps(m))
    with pytest.raises(ReleaseError, match="trained on"):
        evaluate_release(bad, small_sim)


def test_topk_metrics_match_hand_computed_values():
    ndcg, rec = topk_metrics(np.array([5, 1, 7]), {1, 9}, k=3)
    assert rec == 0.5
    assert ndcg == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))


def test_per_user_split_cuts_each_users_own_timeline():
    from models.data import split_cuts, split_mode_for

    u = np.array([1, 1, 1, 1, 2, 2, 3])
    t = np.array([10, 20, 30, 40, 5, 6, 7])
    c1, c2 = split_cuts(u, t, "per_user", (0.5, 0.75))
    assert c1.tolist()[:4] == [30] * 4 and c2.tolist()[:4] == [40] * 4  # user 1: 2 train, 1 valid, 1 test
    assert (t[4:6] < c1[4:6]).tolist() == [True, False]  # user 2: first row train, second held out
    assert t[6] < c1[6]  # a user with one row keeps it for training
    g1, g2 = split_cuts(u, t, "time", (0.5, 0.75))
    assert len(set(g1.tolist())) == 1 and len(set(g2.tolist())) == 1
    assert split_mode_for("movielens") == "per_user" and split_mode_for("simulated") == "time"
    with pytest.raises(ValueError, match="split mode"):
        split_cuts(u, t, "random")


def test_releases_and_eval_from_the_command_line(tiny_release, small_sim):
    import subprocess
    import sys

    def parity(*args):
        p = subprocess.run([sys.executable, "-m", "parity", *args], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return p.stdout

    root = str(tiny_release.path.parent)
    assert tiny_release.release_id in parity("releases", "list", "--root", root)
    shown = json.loads(parity("releases", "show", tiny_release.release_id, "--root", root))
    assert shown["release_id"] == tiny_release.release_id and "reference" not in shown
    last = json.loads(parity("eval", "--release", str(tiny_release.path), "--events", str(small_sim)).strip().splitlines()[-1])
    assert set(last["two_stage"]) == {"popularity", "two_tower", "teacher_fp32", "student_fp32", "student_int8"}
    assert set(last["targets"]) == {"int8_within_1pct_of_teacher", "two_stage_vs_popularity", "int8_size_vs_teacher"}


def test_the_published_protocol_measures_popularity_mf_and_parity_on_movielens(movielens_dir, tmp_path):
    from features.movielens import import_movielens
    from pipeline.protocol_eval import published_protocol

    import_movielens(movielens_dir, tmp_path / "ml")
    res = published_protocol(tmp_path / "ml", profile="tiny")
    ranked = {"popularity", "mf_als", "parity_two_tower", "parity_two_stage", "parity_two_stage_teacher", "parity_item_item"}
    assert set(res) == ranked | {"parity_order"}
    assert all(res[k]["users"] > 900 and 0 <= res[k]["ndcg@10"] <= 1 for k in ranked)
    assert res["mf_als"]["ndcg@10"] > res["popularity"]["ndcg@10"]  # the baseline is a real one
    with pytest.raises(ValueError, match="holdout"):
        published_protocol(tmp_path / "ml", profile="tiny", holdout="train")
    from features.eventlog import EventLog
    from models.protocol import protocol_split

    # holdout="valid": the training 80% split again; its held-out pairs are training pairs of the test split
    valid = published_protocol(tmp_path / "ml", profile="tiny", holdout="valid")
    assert set(valid) == ranked | {"parity_two_stage_item_item"} and valid["mf_als"]["ndcg@10"] > valid["popularity"]["ndcg@10"]
    # the test run's order was chosen on exactly this validation pass, never on the test 20%
    both = {"item_item": valid["parity_two_stage_item_item"]["ndcg@10"], "ranker": valid["parity_two_stage"]["ndcg@10"]}
    assert res["parity_order"]["valid_ndcg@10"] == both
    assert res["parity_order"]["order"] == ("item_item" if both["item_item"] > both["ranker"] else "ranker")
    events = EventLog(tmp_path / "ml" / "events").read().deduplicated()
    outer = protocol_split(events, 0)
    inner = protocol_split(outer.train_events, 1, test_frac=0.125)
    pairs = lambda s, u, i: set(zip(s.user_ids[u].tolist(), s.item_ids[i].tolist()))  # noqa: E731
    assert pairs(inner, inner.test_u, inner.test_i) <= pairs(outer, outer.train_u, outer.train_i)
    assert valid["mf_als"]["users"] == len(np.unique(inner.test_u))


def test_movielens_rankers_learn_on_candidate_lists_and_eval_reads_them(movielens_dir, tmp_path, monkeypatch):
    """MovieLens logs no impressions: its rankers train on the two-tower's candidate lists, with
    the list-relative retrieval columns as inputs; the same seed gives the same release. The
    item-item models behind retrieval.item_item see only rows before each list's query time."""
    import models.candidates as candidates
    import pipeline.train as pipeline
    from features.assemble import RETRIEVAL_COLUMNS
    from features.movielens import import_movielens

    fitted = []

    fit = candidates.item_item_for

    def recording(split, *args):
        fitted.append(split)
        return fit(split, *args)

    monkeypatch.setattr(candidates, "item_item_for", recording)
    monkeypatch.setattr(pipeline, "item_item_for", recording)
    import_movielens(movielens_dir, tmp_path / "ml")
    keep: dict = {}
    rel = train_release(tmp_path / "ml", tmp_path / "releases", profile="tiny", seed=0, keep=keep)
    monkeypatch.undo()
    rd = keep["ranker_data"]
    assert len(fitted) == 2  # the release's (train split), the training lists' (early rows)
    for split, lists in ((fitted[1], rd.train), (fitted[0], rd.valid), (fitted[0], rd.test)):
        query_at = dict(zip(lists.user_id.tolist(), lists.ts.tolist()))
        assert all(t < query_at.get(u, np.iinfo(np.int64).max) for u, t in zip(split.user_id.tolist(), split.ts.tolist()))
    assert len(fitted[1]) < len(fitted[0])
    m = rel.manifest
    assert m["config"]["ranker_rows"] == "candidates" and m["retrieval"]["history_len"] == 20
    assert list(m["ranker_inputs"]["columns"][-3:]) == list(RETRIEVAL_COLUMNS)
    assert m["retrieval"]["item_item"]["items"] > 1000 and ReleaseRuntime.load(rel).item_item is not None
    assert all(m["training_data"]["ranker_rows"][s] > 0 for s in ("train", "valid", "test"))
    # the candidate union's quotas: the retrieval budget split between the tower and item-item on validation
    q, study = m["retrieval"]["candidates"], m["retrieval"]["candidate_quotas_valid"]
    assert q["retrieve_k"] + q["n_item_item"] == study["budget"] == 200 and q["n_item_item"] in study["n_item_item"]
    mean = (np.asarray(study["valid_recall_next"]) + np.asarray(study["valid_recall_missing"])) / 2
    assert mean[study["n_item_item"].index(q["n_item_item"])] == mean.max()
    assert ReleaseRuntime.load(rel).release.meta.candidates == q
    assert m["metrics"]["quantization"]["mean_tau"] >= 0.95
    res = evaluate_release(rel.path, tmp_path / "ml", max_users=150)
    assert res.users == 150 and all(0 <= v["ndcg@10"] <= 1 for v in res.two_stage.values())
    again = train_release(tmp_path / "ml", tmp_path / "again", profile="tiny", seed=0)
    assert again.manifest["training_data"] == m["training_data"] and again.manifest["metrics"]["ranking_test"] == m["metrics"]["ranking_test"]
    assert again.manifest["files"]["retrieval/item_item.npy"] == m["files"]["retrieval/item_item.npy"]
