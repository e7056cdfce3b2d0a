"""monitor.drift: the statistics against hand-checkable cases and scipy, the alarm rule
(effect size AND BH-adjusted significance, or a missing-rate rise), and the sliding window."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from export.reference import column_references, histogram_reference, psi
from monitor.drift import PREDICTION, DriftThresholds, SlidingDrift, drift_report


def _ref(X: np.ndarray, names: list[str], *, sample: int = 1000, pred: np.ndarray | None = None) -> dict:
    out = {"features": column_references(X, names, sample=sample)}
    if pred is not None:
        out["prediction"] = histogram_reference(pred, bins=20, sample=sample)
    return out


def _two_bins(**extra) -> dict:
    return {"features": {"x": {"edges": [0.0], "shares": [0.5, 0.5], "missing_rate": 0.0, **extra}}}


def test_psi_kl_and_js_match_hand_computed_values_on_two_bins():
    X = np.r_[np.full(300, -1.0), np.full(100, 1.0)][:, None]  # live shares 0.75 / 0.25 against 0.5 / 0.5
    f = drift_report(_two_bins(), ["x"], X).features[0]
    assert f.psi == pytest.approx(0.25 * math.log(1.5) + 0.25 * math.log(2.0))
    assert f.kl == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    m = np.array([0.625, 0.375])
    jsd = 0.5 * (0.75 * math.log2(0.75 / m[0]) + 0.25 * math.log2(0.25 / m[1])) + 0.5 * (0.5 * math.log2(0.5 / m[0]) + 0.5 * math.log2(0.5 / m[1]))
    assert f.js == pytest.approx(math.sqrt(jsd))
    assert f.js == pytest.approx(jensenshannon([0.75, 0.25], [0.5, 0.5], base=2))


def test_psi_is_the_same_number_export_reference_computes():
    rng = np.random.default_rng(1)
    ref = _ref(rng.normal(size=(5000, 1)), ["x"])
    live = rng.normal(0.3, 1.2, 3000)
    assert drift_report(ref, ["x"], live[:, None]).features[0].psi == pytest.approx(psi(ref["features"]["x"], live))


def test_an_old_reference_without_row_count_uses_chi_square_goodness_of_fit():
    X = np.r_[np.full(230, -1.0), np.full(170, 1.0)][:, None]
    f = drift_report(_two_bins(), ["x"], X).features[0]
    assert f.test == "chi2_gof"
    assert f.p_value == pytest.approx(stats.chisquare([230, 170], [200, 200]).pvalue)


def test_a_reference_with_its_row_count_is_tested_as_a_second_sample():
    X = np.r_[np.full(230, -1.0), np.full(170, 1.0)][:, None]
    f = drift_report(_two_bins(n=1000), ["x"], X).features[0]
    assert f.test == "chi2"
    assert f.p_value == pytest.approx(stats.chi2_contingency([[230, 170], [500, 500]], correction=False).pvalue)
    assert f.p_value > stats.chisquare([230, 170], [200, 200]).pvalue  # the reference's own noise is counted


def test_continuous_columns_with_a_raw_sample_use_two_sample_ks():
    rng = np.random.default_rng(2)
    ref = _ref(rng.normal(size=(20_000, 1)), ["x"])
    live = rng.normal(0.1, 1.0, 2000).astype(np.float32)
    f = drift_report(ref, ["x"], live[:, None]).features[0]
    assert f.test == "ks"
    sample = np.asarray(ref["features"]["x"]["sample"], dtype=np.float32).astype(np.float64)
    assert f.p_value == pytest.approx(stats.ks_2samp(live.astype(np.float64), sample).pvalue)


def test_count_columns_use_chi_square_even_with_a_raw_sample():
    rng = np.random.default_rng(3)
    ref = _ref(rng.poisson(3, (20_000, 1)).astype(float), ["n"])
    assert ref["features"]["n"]["discrete"] is True and "sample" not in ref["features"]["n"]  # none stored: KS never reads it
    ref["features"]["n"]["sample"] = rng.poisson(3, 1000).astype(float).tolist()
    f = drift_report(ref, ["n"], rng.poisson(3, (2000, 1)).astype(float)).features[0]
    assert f.test == "chi2"


def test_p_values_are_adjusted_with_benjamini_hochberg_across_columns_and_the_decision_reads_the_adjusted_one():
    rng = np.random.default_rng(4)
    names = [f"c{i}" for i in range(8)]
    ref = _ref(rng.normal(size=(20_000, 8)), names)
    X = rng.normal(size=(3000, 8))
    X[:, 0] += 0.6
    rep = drift_report(ref, names, X)
    raw = [f.p_value for f in rep.features]
    assert [f.p_adjusted for f in rep.features] == pytest.approx(stats.false_discovery_control(raw, method="bh").tolist())
    # a column whose raw p clears alpha but whose adjusted p does not is not drifted
    th = DriftThresholds(psi=0.0, js=0.0, alpha=0.05)
    rep = drift_report(ref, names, X, thresholds=th)
    for f in rep.features:
        assert f.drifted == (f.p_adjusted < 0.05)


def test_no_alarm_on_samples_of_the_reference_distribution_over_many_seeds():
    rng = np.random.default_rng(5)
    names = ["normal", "lognormal", "counts"]
    def draw(r, n):
        return np.column_stack([r.normal(size=n), r.lognormal(0, 1, n), r.poisson(4, n).astype(float)])
    ref = _ref(draw(rng, 20_000), names, pred=rng.beta(2, 5, 20_000))
    alarms, small_p, tests = 0, 0, 0
    for seed in range(60):
        r = np.random.default_rng(1000 + seed)
        rep = drift_report(ref, names, draw(r, 5000), r.beta(2, 5, 5000))
        alarms += len(rep.drifted)
        small_p += sum(f.p_value < 0.01 for f in (*rep.features, rep.prediction))
        tests += 4
    assert alarms == 0
    assert small_p / tests <= 0.03  # the p-values themselves are honest (about alpha = 0.01 of them below it)


def test_a_shifted_column_alarms_and_the_others_do_not():
    rng = np.random.default_rng(6)
    names = ["a", "b", "c"]
    ref = _ref(rng.normal(size=(20_000, 3)), names)
    X = rng.normal(size=(5000, 3))
    X[:, 1] = X[:, 1] * 1.5 + 1.0
    rep = drift_report(ref, names, X)
    assert rep.drifted == ("b",)
    assert set(rep.feature("b").reasons) >= {"psi"}
    X[:, 1] = X[:, 1] * 0 + rng.normal(0.15, 1.0, 5000)  # a small shift: significant, under the calibrated effect sizes
    small = drift_report(ref, names, X)
    assert small.drifted == () and small.feature("b").p_adjusted < 1e-3


def test_a_trivial_shift_in_a_huge_sample_is_significant_but_does_not_alarm():
    rng = np.random.default_rng(7)
    ref = _ref(rng.normal(size=(50_000, 1)), ["x"], sample=0)  # chi-square on 50,000 reference rows: a powerful test
    f = drift_report(ref, ["x"], rng.normal(0.05, 1.0, (200_000, 1))).features[0]
    assert f.p_adjusted < 1e-6 and f.psi < 0.01
    assert not f.drifted


def test_a_large_effect_in_too_few_rows_does_not_alarm():
    rng = np.random.default_rng(8)
    ref = _ref(rng.normal(size=(20_000, 1)), ["x"])
    rep = drift_report(ref, ["x"], rng.normal(2.0, 1.0, (150, 1)))
    assert rep.drifted == () and rep.features[0].psi is None
    assert drift_report(ref, ["x"], rng.normal(2.0, 1.0, (150, 1)), thresholds=DriftThresholds(min_rows=100)).drifted == ("x",)


def test_a_missing_rate_rise_alarms_and_a_small_one_does_not():
    rng = np.random.default_rng(9)
    ref = _ref(rng.normal(size=(20_000, 1)), ["x"])
    x = rng.normal(size=5000)
    x[:500] = np.nan  # 10 % missing where training had none
    f = drift_report(ref, ["x"], x[:, None]).features[0]
    assert f.drifted and f.reasons == ("missing",) and f.missing_rate == pytest.approx(0.1)
    x = rng.normal(size=5000)
    x[:100] = np.nan  # 2 %: below the 5-point threshold
    assert not drift_report(ref, ["x"], x[:, None]).features[0].drifted


def test_predictions_are_checked_as_their_own_entry():
    rng = np.random.default_rng(10)
    ref = _ref(rng.normal(size=(20_000, 1)), ["x"], pred=rng.beta(2, 5, 20_000))
    rep = drift_report(ref, ["x"], rng.normal(size=(3000, 1)), rng.beta(5, 2, 3000))
    assert rep.drifted == (PREDICTION,)
    assert rep.prediction.p_adjusted == rep.prediction.p_value


def test_the_report_serialises_to_one_line_of_json_with_nulls_for_what_was_not_computed():
    rng = np.random.default_rng(11)
    ref = _ref(rng.normal(size=(2000, 2)), ["a", "b"])
    line = drift_report(ref, ["a", "b"], rng.normal(size=(50, 2))).to_json()
    assert "\n" not in line
    d = json.loads(line)
    assert d["features"]["a"]["psi"] is None and d["drifted"] == [] and d["thresholds"]["psi"] == DriftThresholds().psi


def test_bad_input_is_refused_with_the_reason():
    ref = _two_bins()
    with pytest.raises(ValueError, match="no histogram for 1 column"):
        drift_report(ref, ["y"], np.zeros((10, 1)))
    with pytest.raises(ValueError, match="shape"):
        drift_report(ref, ["x"], np.zeros((10, 2)))
    with pytest.raises(ValueError, match="alpha"):
        DriftThresholds(alpha=1.5)
    with pytest.raises(ValueError, match="psi"):
        DriftThresholds(psi=-1)
    with pytest.raises(TypeError, match="min_rows"):
        DriftThresholds(min_rows=2.5)


H = 3_600_000


def _sliding_setup(reservoir: int = 512):
    rng = np.random.default_rng(12)
    ref = _ref(rng.normal(size=(20_000, 2)), ["a", "b"], pred=rng.random(20_000))
    return rng, ref, SlidingDrift(ref, ["a", "b"], window_ms=H, buckets=4, reservoir=reservoir)


def test_the_sliding_window_forgets_rows_older_than_the_window():
    rng, _, sd = _sliding_setup()
    t0 = 10 * H
    X = rng.normal(size=(1000, 2))
    X[:, 0] += 2.0
    sd.add(X, rng.random(1000), t0)
    assert sd.report(t0 + H // 2).drifted == ("a",)
    sd.add(rng.normal(size=(1000, 2)), rng.random(1000), t0 + H)
    late = sd.report(t0 + H + 1)  # the shifted bucket is a whole window old now
    assert late.rows == 1000 and late.drifted == ()


def test_poll_names_features_newly_alerting_once_then_cleared_then_alerting_again():
    rng, _, sd = _sliding_setup()
    shifted = rng.normal(size=(1000, 2)) + np.array([2.0, 0.0])
    sd.add(shifted, rng.random(1000), 0)
    first = sd.poll(1)
    assert first.new_alerts == ("a",) and first.cleared == ()
    sd.add(shifted, rng.random(1000), 2)
    assert sd.poll(3).new_alerts == ()  # still drifting: no second alert event
    sd.add(rng.normal(size=(1000, 2)), rng.random(1000), H)
    after = sd.poll(H + 1)
    assert after.new_alerts == () and after.cleared == ("a",)
    sd.add(shifted, rng.random(1000), 2 * H)
    sd.add(shifted, rng.random(1000), 2 * H + 1)
    assert sd.poll(2 * H + 2).new_alerts == ("a",)


def test_the_sliding_window_computes_what_the_batch_report_computes_on_the_same_rows():
    rng, ref, sd = _sliding_setup(reservoir=2000)
    X = rng.normal(size=(1500, 2)) * np.array([1.0, 1.3])
    p = rng.random(1500)
    ts = np.sort(rng.integers(0, H, 1500))
    for a in range(0, 1500, 100):
        sd.add(X[a:a + 100], p[a:a + 100], ts[a:a + 100])
    slide, batch = sd.report(H - 1), drift_report(ref, ["a", "b"], X, p)
    for s, b in zip((*slide.features, slide.prediction), (*batch.features, batch.prediction)):
        assert (s.name, s.rows, s.counts, s.test) == (b.name, b.rows, b.counts, b.test)
        assert s.psi == pytest.approx(b.psi) and s.p_value == pytest.approx(b.p_value)


def test_the_sliding_window_memory_is_bounded_by_its_reservoir():
    rng, _, sd = _sliding_setup(reservoir=64)
    for i in range(20):
        sd.add(rng.normal(size=(500, 2)), rng.random(500), i)
    (bucket,) = sd._buckets.values()
    assert bucket.rows == 10_000 and bucket.sample.shape == (64, 2)
    assert np.isfinite(bucket.sample).all()
    assert sd.report(30).features[0].test == "ks"


def test_merged_windows_count_exactly_what_one_window_fed_every_row_counts():
    rng, ref, one = _sliding_setup(reservoir=4000)
    _, _, w1 = _sliding_setup(reservoir=4000)
    _, _, w2 = _sliding_setup(reservoir=4000)
    X = rng.normal(size=(3000, 2)) + np.array([0.4, 0.0])
    X[rng.random(3000) < 0.1, 1] = np.nan
    p = rng.random(3000)
    ts = np.sort(rng.integers(0, H, 3000))
    one.add(X, p, ts)
    half = rng.random(3000) < 0.3  # two workers see different shares of the traffic
    w1.add(X[half], p[half], ts[half])
    w2.add(X[~half], p[~half], ts[~half])
    w1.merge(w2)
    a, b = one.report(H - 1), w1.report(H - 1)
    for s, t in zip((*a.features, a.prediction), (*b.features, b.prediction)):
        assert (s.rows, s.present, s.counts) == (t.rows, t.present, t.counts)
        assert s.psi == pytest.approx(t.psi) and s.p_value == pytest.approx(t.p_value)  # reservoirs big enough: every row kept
    assert b.drifted == a.drifted and a.feature("a").p_value < 1e-6 and a.feature("b").p_value > 1e-3
    assert sum(bk.rows for bk in w2._buckets.values()) == int((~half).sum())  # the other side is unchanged


def test_a_merged_reservoir_draws_each_worker_in_proportion_to_the_rows_it_saw():
    _, _, w1 = _sliding_setup(reservoir=200)
    _, _, w2 = _sliding_setup(reservoir=200)
    w1.add(np.zeros((9000, 2)), np.zeros(9000), 5)  # 90 % of the rows, all zeros
    w2.add(np.ones((1000, 2)), np.ones(1000), 5)  # 10 %, all ones
    w1.merge(w2)
    (bk,) = w1._buckets.values()
    assert bk.rows == bk.seen == 10_000 and np.isfinite(bk.sample).all()
    share_b = float(bk.sample[:, 0].mean())
    assert 0.03 < share_b < 0.2  # ~10 % from the smaller worker, not half (a naive concatenation would give 50 %)
    assert np.array_equal(bk.sample[:, 0], bk.pred_sample)  # a row's prediction travels with its features


def test_merge_refuses_a_window_of_other_columns_or_buckets():
    rng = np.random.default_rng(1)
    ref = _ref(rng.normal(size=(2000, 2)), ["a", "b"], pred=rng.random(2000))
    sd = SlidingDrift(ref, ["a", "b"], window_ms=H, buckets=4)
    with pytest.raises(ValueError, match="different"):
        sd.merge(SlidingDrift(ref, ["b", "a"], window_ms=H, buckets=4))
    with pytest.raises(ValueError, match="different"):
        sd.merge(SlidingDrift(ref, ["a", "b"], window_ms=H, buckets=2))
    with pytest.raises(TypeError):
        sd.merge(object())


def test_counts_round_trip_through_json_and_rebuild_the_same_report():
    rng, ref, sd = _sliding_setup(reservoir=300)
    for i in range(4):
        X = rng.normal(size=(400, 2)) + np.array([0.5 * i, 0.0])
        X[rng.random(400) < 0.05, 0] = np.nan
        sd.add(X, rng.random(400), i * H // 4 + 7)
    state = json.loads(json.dumps(sd.counts()))  # a store holds JSON
    back = SlidingDrift.from_counts(ref, ["a", "b"], state)
    a, b = sd.report(H - 1), back.report(H - 1)
    for s, t in zip((*a.features, a.prediction), (*b.features, b.prediction)):
        assert (s.rows, s.present, s.counts, s.test) == (t.rows, t.present, t.counts, t.test)
    assert b.drifted == a.drifted and a.feature("a").p_value < 1e-6
    # a rebuilt window keeps sliding and merging
    back.add(rng.normal(size=(400, 2)), rng.random(400), H + 5)
    assert back.report(H + 6).rows == 3 * 400 + 400
    with pytest.raises(ValueError, match="other columns"):
        SlidingDrift.from_counts(ref, ["b", "a"], state)
