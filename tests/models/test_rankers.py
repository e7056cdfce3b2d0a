"""Rankers: the metrics they are judged by, the input transform, teacher and student training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.metrics import auc, candidate_lists, grouped_mean, kendall_tau, logloss, ndcg_at_k, recall_at_k
from models.ranker import RankerConfig, StudentRanker, TeacherRanker, predict, train_student, train_teacher
from models.transforms import FeatureTransform, TransformStats, fit_transform_stats


@pytest.fixture(scope="module")
def tiny_td(tmp_path_factory: pytest.TempPathFactory):
    from features.simulator import simulate
    from models.data import build_training_data

    out = tmp_path_factory.mktemp("rankers") / "data"
    simulate(out, users=300, items=80, days=5, seed=1)
    return build_training_data(out)


@pytest.fixture(scope="module")
def tiny_cfg() -> RankerConfig:
    return RankerConfig.for_profile("tiny")


@pytest.fixture(scope="module")
def teacher(tiny_td, tiny_cfg) -> TeacherRanker:
    return train_teacher(tiny_td, tiny_cfg, seed=0)


@pytest.fixture(scope="module")
def student(tiny_td, teacher, tiny_cfg) -> StudentRanker:
    return train_student(tiny_td, teacher, tiny_cfg, seed=0)


# ---------------------------------------------------------------------------------------------
# metrics, against hand-computed values


def test_auc_counts_tied_pairs_as_half():
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4) (0.8>0.1) (0.4=0.4 -> 1/2) (0.4>0.1) = 3.5 / 4
    assert auc([1, 0, 1, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert auc([1, 1, 0], [0.1, 0.2, 0.9]) == 0.0
    assert np.isnan(auc([1, 1], [0.1, 0.2]))


def test_logloss_matches_the_formula():
    expected = -(np.log(0.8) + np.log(1 - 0.3)) / 2
    assert logloss([1, 0], [0.8, 0.3]) == pytest.approx(expected)


def test_ndcg_at_k_by_hand():
    # ranking by score: rel 0, 1, 1, 0 -> DCG@3 = 1/log2(3) + 1/log2(4); ideal = 1 + 1/log2(3)
    got = ndcg_at_k([1, 0, 1, 0], [0.8, 0.9, 0.7, 0.1], k=3)
    assert got == pytest.approx((1 / np.log2(3) + 0.5) / (1 + 1 / np.log2(3)))
    assert ndcg_at_k([0, 1, 0], [0.1, 0.9, 0.5], k=10) == 1.0
    assert np.isnan(ndcg_at_k([0, 0, 0], [0.1, 0.9, 0.5], k=10))  # no relevant item: undefined


def test_ndcg_of_tied_scores_is_the_expectation_over_orderings():
    # two items tied at the top, one relevant: it is at rank 1 or 2 with equal chance
    got = ndcg_at_k([0, 1, 0], [0.5, 0.5, 0.1], k=10)
    assert got == pytest.approx((1.0 + 1 / np.log2(3)) / 2)
    assert ndcg_at_k([1, 0, 0], [0.5, 0.5, 0.1], k=10) == pytest.approx(got)  # input order does not matter


def test_recall_at_k_by_hand_with_a_tie_across_the_cut():
    assert recall_at_k([1, 0, 1, 0], [0.9, 0.8, 0.1, 0.2], k=2) == pytest.approx(0.5)
    # ranks 2-3 tied with one relevant among them and k=2: the tie group has one of its 2 slots in the top 2
    assert recall_at_k([0, 1, 0], [0.9, 0.5, 0.5], k=2) == pytest.approx(0.5)


def test_kendall_tau_b_with_ties_by_hand():
    # a = (1, 2, 2, 3), b = (1, 3, 2, 2): pairs (6): concordant 3, discordant 1, tied in a: 1, tied in b: 1
    # (the pair (2,3) is tied in a only, the pair (3,4) in b only) -> (3 - 1) / sqrt((6-1)(6-1)) = 0.4
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 2]) == pytest.approx(0.4)
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


def test_kendall_tau_b_matches_a_naive_pair_count_on_random_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 30).astype(float), rng.integers(0, 5, 30).astype(float)
    c = d = ta = tb = 0
    for i in range(30):
        for j in range(i + 1, 30):
            s = np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
            c += s > 0
            d += s < 0
            ta += a[i] == a[j]
            tb += b[i] == b[j]
    p = 30 * 29 // 2
    assert kendall_tau(a, b) == pytest.approx((c - d) / np.sqrt((p - ta) * (p - tb)))


def test_candidate_lists_group_by_user_and_drop_short_lists():
    users = np.array([3, 1, 3, 1, 2, 3, 1, 3])
    lists = candidate_lists(users, min_size=3)
    assert [sorted(users[g].tolist()) for g in lists] == [[1, 1, 1], [3, 3, 3, 3]]
    ts = np.array([0, 0, 10, 0, 0, 99, 0, 98])
    by_bucket = candidate_lists(users, ts, bucket_ms=50, min_size=1)
    assert sorted(len(g) for g in by_bucket) == [1, 2, 2, 3]


def test_grouped_mean_skips_undefined_lists():
    rel = np.array([1, 0, 0, 0, 1, 0])
    score = np.array([0.9, 0.1, 0.3, 0.2, 0.1, 0.5])
    out = grouped_mean(ndcg_at_k, [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])], rel, score)
    assert (out.n_lists, out.n_skipped) == (2, 1)
    assert out.value == pytest.approx((1.0 + 1 / np.log2(3)) / 2)


# ---------------------------------------------------------------------------------------------
# the input transform


def _toy_matrix() -> np.ndarray:
    rng = np.random.default_rng(0)
    n = 1000
    heavy = rng.pareto(1.5, n) * 50  # non-negative, heavy tail -> log1p
    normal = rng.normal(3.0, 1.0, n)  # not logged, has NaNs
    normal[rng.random(n) < 0.2] = np.nan
    const = np.full(n, 7.0)  # never missing, constant -> normalises to 0
    allnan = np.full(n, np.nan)  # always missing -> 0 plus a flag
    return np.stack([heavy, normal, const, allnan], axis=1).astype(np.float32)


def test_transform_statistics_follow_the_training_rows():
    X = _toy_matrix()
    st = fit_transform_stats(X, ["heavy", "normal", "const", "allnan"])
    assert st.log1p.tolist() == [True, False, False, False]
    assert st.median[1] == pytest.approx(np.nanmedian(X[:, 1]))
    assert st.median[3] == 0.0
    assert st.flag_columns == (1, 3)
    assert st.std[2] == 1.0 and st.std[3] == 1.0  # constant columns do not divide by zero
    assert st.clip_hi[0] == pytest.approx(np.quantile(np.log1p(X[:, 0].astype(np.float64)), 0.999))


def test_transform_output_is_finite_normalised_values_plus_missing_flags():
    X = _toy_matrix()
    tr = FeatureTransform.fit(X, ["heavy", "normal", "const", "allnan"])
    Z = tr(torch.from_numpy(X)).numpy()
    assert Z.shape == (len(X), 4 + 2) and tr.out_features == 6
    assert np.isfinite(Z).all()
    assert Z[:, 0].mean() == pytest.approx(0.0, abs=1e-4) and Z[:, 0].std() == pytest.approx(1.0, abs=1e-3)
    assert np.array_equal(Z[:, 4], np.isnan(X[:, 1]).astype(np.float32))
    assert (Z[:, 5] == 1.0).all() and (Z[:, 2] == 0.0).all() and (Z[:, 3] == 0.0).all()
    # a missing value becomes the median, i.e. the same as observing the median
    row = np.array([[np.nan, np.nan, np.nan, np.nan], [tr.stats.median[0], tr.stats.median[1], 7.0, 0.0]], np.float32)
    out = tr(torch.from_numpy(row)).numpy()
    assert np.allclose(out[0, :4], out[1, :4], atol=1e-6)
    # out-of-range and infinite inputs clip instead of exploding
    wild = np.array([[1e30, -1e30, np.inf, -np.inf]], np.float32)
    assert np.isfinite(tr(torch.from_numpy(wild)).numpy()).all()


def test_transform_stats_dict_is_json_and_rebuilds_the_same_transform():
    X = _toy_matrix()
    tr = FeatureTransform.fit(X, ["heavy", "normal", "const", "allnan"])
    d = json.loads(json.dumps(tr.stats_dict()))
    assert d["missing_flag_columns"] == ["normal", "allnan"]
    again = FeatureTransform.from_stats_dict(d)
    x = torch.from_numpy(X[:50])
    assert torch.equal(tr(x), again(x))
    assert isinstance(TransformStats.from_dict(d), TransformStats)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, see export.onnx_export
def test_transform_matches_between_torch_and_onnx_runtime(tmp_path: Path, tiny_td):
    import onnxruntime as ort

    tr = FeatureTransform.fit(tiny_td.train.X, tiny_td.columns).eval()
    X = tiny_td.valid.X.copy()
    X[::7, ::3] = np.nan  # more missing values than the data has
    X = np.concatenate([X, np.full((1, X.shape[1]), np.nan, np.float32)])
    path = tmp_path / "transform.onnx"
    torch.onnx.export(tr, (torch.from_numpy(X[:2]),), str(path), input_names=["features"], output_names=["z"],
                      opset_version=17, dynamic_axes={"features": {0: "n"}, "z": {0: "n"}}, dynamo=False)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"features": X})[0]
    want = tr(torch.from_numpy(X)).numpy()
    assert np.isnan(X).any() and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# teacher and student


def test_profiles_are_known_and_validated():
    assert RankerConfig.for_profile("tiny").max_epochs < RankerConfig.for_profile("default").max_epochs
    with pytest.raises(ValueError, match="unknown profile"):
        RankerConfig.for_profile("huge")
    with pytest.raises(ValueError, match="alpha"):
        RankerConfig(alpha=1.5)
    with pytest.raises(TypeError, match="student_hidden"):
        RankerConfig(student_hidden=[16])


def test_teacher_learns_on_tiny_data(tiny_td, teacher):
    p = predict(teacher, tiny_td.valid.X)
    assert p.shape == (len(tiny_td.valid),) and ((p > 0) & (p < 1)).all()
    assert auc(tiny_td.valid.label, p) > 0.55
    assert teacher.fit_info.best_valid_auc == pytest.approx(auc(tiny_td.valid.label, p), abs=1e-6)


def test_student_learns_on_tiny_data_and_is_smaller(tiny_td, teacher, student):
    p = predict(student, tiny_td.valid.X)
    assert auc(tiny_td.valid.label, p) > 0.55
    assert student.n_parameters() * 2 < teacher.n_parameters()
    assert student.transform.stats_dict() == teacher.transform.stats_dict()


def test_student_follows_the_teacher_within_lists(tiny_td, teacher, student):
    lists = candidate_lists(tiny_td.valid.user_id, min_size=5)
    tau = grouped_mean(kendall_tau, lists, predict(teacher, tiny_td.valid.X), predict(student, tiny_td.valid.X))
    assert tau.value > 0.5  # a distilled student orders candidates like its teacher


def test_same_seed_gives_identical_predictions(tiny_td, tiny_cfg, teacher, student):
    again = train_teacher(tiny_td, tiny_cfg, seed=0)
    assert np.array_equal(predict(again, tiny_td.test.X), predict(teacher, tiny_td.test.X))
    s_again = train_student(tiny_td, teacher, tiny_cfg, seed=0)
    assert np.array_equal(predict(s_again, tiny_td.test.X), predict(student, tiny_td.test.X))
    other = train_student(tiny_td, teacher, tiny_cfg, seed=1)
    assert not np.array_equal(predict(other, tiny_td.test.X), predict(student, tiny_td.test.X))


def test_training_leaves_the_global_torch_state_alone(tiny_td, teacher, tiny_cfg):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    train_student(tiny_td, teacher, tiny_cfg.replace(max_epochs=1), seed=5)
    assert torch.equal(torch.rand(3), before)
    assert torch.get_num_threads() == threads


def test_distillation_with_augmented_rows_trains(tiny_td, teacher, tiny_cfg):
    s = train_student(tiny_td, teacher, tiny_cfg.replace(augment_ratio=0.5, max_epochs=3), seed=0)
    assert auc(tiny_td.valid.label, predict(s, tiny_td.valid.X)) > 0.55


def test_a_row_cap_trains_on_the_most_recent_rows(tiny_td, tiny_cfg):
    """max_train_rows keeps the last rows (training rows are in time order), for the transform too."""
    cap = len(tiny_td.train) // 3
    m = train_teacher(tiny_td, tiny_cfg.replace(max_train_rows=cap, max_epochs=1), seed=0)
    assert m.fit_info.n_train_rows == cap
    want = FeatureTransform.fit(tiny_td.train.X[-cap:], tiny_td.columns, z_max=tiny_cfg.z_max)
    assert m.transform.stats_dict() == want.stats_dict()


def test_a_refit_trains_exactly_the_epochs_it_is_given_and_keeps_the_last_weights(tiny_td, tiny_cfg):
    """`epochs=` (pipeline.train's refit on the training and validation lists): no early stopping,
    no validation score, the same seed gives the same weights."""
    a = train_teacher(tiny_td, tiny_cfg, seed=0, epochs=2)
    assert a.fit_info.epochs_run == a.fit_info.best_epoch == 2 and a.fit_info.valid_auc_history == ()
    b = train_teacher(tiny_td, tiny_cfg, seed=0, epochs=2)
    np.testing.assert_array_equal(predict(a, tiny_td.valid.X), predict(b, tiny_td.valid.X))
    s = train_student(tiny_td, a, tiny_cfg, seed=0, epochs=1)
    assert s.fit_info.epochs_run == 1 and np.isfinite(predict(s, tiny_td.valid.X)).all()
