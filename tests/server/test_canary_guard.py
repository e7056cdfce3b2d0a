"""The canary guard rolls back a canary that is slow, failing, missing features, drifting or
worse for users, leaves a healthy one alone, and promotes it only when asked and clean.
Time is an argument: nothing sleeps."""
from __future__ import annotations

import json

import numpy as np
import pytest

from export.reference import histogram_reference, psi
from server.canary_guard import (
    LATENCY_EDGES_MS,
    CanaryGuard,
    GuardThresholds,
    LocalGuardCounters,
    PredictionReference,
    StoreGuardCounters,
    p_quantile_ms,
    psi_from_counts,
)
from server.errors import InvalidArgument

T0 = 1_767_571_200_000
RNG_REF = np.random.default_rng(0)
REF = PredictionReference.from_manifest({"prediction": histogram_reference(RNG_REF.normal(0.0, 1.0, 20_000), bins=20)})


def _guard(**kw) -> CanaryGuard:
    auto = kw.pop("auto_promote", False)
    counters = kw.pop("counters", None)
    return CanaryGuard(GuardThresholds(**kw), {"primary": REF, "canary": REF}, started_ms=T0, counters=counters, auto_promote=auto,
                       release_ids={"primary": "rel-a", "canary": "rel-b"})


def _serve(g: CanaryGuard, rng: np.random.Generator, start_ms: int, seconds: int, per_s: dict[str, int], *, slow: float = 1.0,
           errors: float = 0.0, missing: float = 0.0, shift: float = 0.0) -> int:
    """Requests spread over `seconds`; the canary gets the given degradations. Returns the end time."""
    for s in range(seconds):
        now = start_ms + s * 1000
        for arm, n in per_s.items():
            bad = arm == "canary"
            for _ in range(n):
                lat = rng.lognormal(np.log(8.0), 0.4) * (slow if bad else 1.0)
                g.record_request(arm, now, latency_ms=lat, error=bool(bad and rng.random() < errors),
                                 missing_rate=(missing if bad else 0.0) + 0.02 * rng.random(),
                                 predictions=rng.normal(shift if bad else 0.0, 1.0, 10))
    return start_ms + seconds * 1000


def _feedback(g: CanaryGuard, rng: np.random.Generator, n: dict[str, int], ctr: dict[str, float], watch: dict[str, float]) -> None:
    for arm, k in n.items():
        for _ in range(k):
            imp = 10
            plays = int(rng.binomial(imp, ctr[arm]))
            g.record_feedback(arm, impressions=imp, plays=plays, watch_s=float(rng.exponential(watch[arm]) * plays))


def test_a_healthy_canary_is_left_alone():
    g = _guard()
    rng = np.random.default_rng(1)
    now = _serve(g, rng, T0, 60, {"primary": 30, "canary": 10})
    _feedback(g, rng, {"primary": 1500, "canary": 500}, {"primary": 0.3, "canary": 0.3}, {"primary": 20.0, "canary": 20.0})
    d = g.decide(now)
    assert d.action == "none", d.reason
    assert d.reason == "healthy"
    assert d.numbers["health_judged"] and d.numbers["business_judged"]


def test_nothing_is_judged_below_the_minimum_sample():
    g = _guard(min_requests=200)
    now = _serve(g, np.random.default_rng(2), T0, 10, {"primary": 50, "canary": 15}, slow=10.0, errors=0.5)  # 150 canary requests
    d = g.decide(now)
    assert d.action == "none" and d.reason == "collecting samples"


def test_a_slow_canary_is_rolled_back_with_its_p99_in_the_record():
    g = _guard()
    now = _serve(g, np.random.default_rng(3), T0, 30, {"primary": 30, "canary": 10}, slow=4.0)
    d = g.decide(now)
    assert d.action == "rollback" and d.reason.startswith("latency")
    assert d.numbers["canary"]["p99_ms"] > 2 * d.numbers["primary"]["p99_ms"]
    assert json.loads(d.to_json())["numbers"]["canary"]["requests"] == 300


def test_a_slow_canary_under_the_absolute_floor_is_not_an_incident():
    g = _guard(p99_floor_ms=500.0)
    now = _serve(g, np.random.default_rng(3), T0, 30, {"primary": 30, "canary": 10}, slow=4.0)
    assert g.decide(now).action == "none"


def test_a_failing_canary_is_rolled_back():
    g = _guard()
    now = _serve(g, np.random.default_rng(4), T0, 30, {"primary": 30, "canary": 10}, errors=0.05)
    d = g.decide(now)
    assert d.action == "rollback" and d.reason.startswith("errors")


def test_a_canary_missing_features_is_rolled_back():
    g = _guard()
    now = _serve(g, np.random.default_rng(5), T0, 30, {"primary": 30, "canary": 10}, missing=0.3)
    d = g.decide(now)
    assert d.action == "rollback" and d.reason.startswith("missing features")
    assert d.numbers["canary"]["missing_rate"] == pytest.approx(0.31, abs=0.01)


def test_a_canary_whose_predictions_drift_is_rolled_back():
    g = _guard()
    now = _serve(g, np.random.default_rng(6), T0, 30, {"primary": 30, "canary": 10}, shift=1.0)
    d = g.decide(now)
    assert d.action == "rollback" and d.reason.startswith("prediction drift")


def test_drift_both_arms_share_is_not_blamed_on_the_canary():
    g = _guard()
    rng = np.random.default_rng(7)
    for s in range(30):
        for arm, n in (("primary", 30), ("canary", 10)):
            for _ in range(n):
                g.record_request(arm, T0 + s * 1000, latency_ms=8.0, predictions=rng.normal(1.0, 1.0, 10))
    d = g.decide(T0 + 30_000)
    assert d.numbers["primary"]["prediction_psi"] > 0.3
    assert d.action == "none", d.reason


def test_a_canary_worse_for_users_is_rolled_back_by_the_sequential_test():
    g = _guard()
    rng = np.random.default_rng(8)
    now = _serve(g, rng, T0, 30, {"primary": 30, "canary": 10})
    _feedback(g, rng, {"primary": 1500, "canary": 500}, {"primary": 0.30, "canary": 0.22}, {"primary": 20.0, "canary": 20.0})
    d = g.decide(now)
    assert d.action == "rollback" and d.reason.startswith("CTR")
    assert d.numbers["ctr_test"]["always_valid_p"] <= 0.025  # alpha / 2: two business tests


def test_less_watch_time_alone_is_rolled_back():
    g = _guard()
    rng = np.random.default_rng(9)
    now = _serve(g, rng, T0, 30, {"primary": 30, "canary": 10})
    _feedback(g, rng, {"primary": 3000, "canary": 1000}, {"primary": 0.3, "canary": 0.3}, {"primary": 30.0, "canary": 18.0})
    d = g.decide(now)
    assert d.action == "rollback" and d.reason.startswith("watch time"), d.reason


def test_an_old_incident_slides_out_of_the_window():
    g = _guard(window_s=60, bucket_s=10)
    rng = np.random.default_rng(10)
    end = _serve(g, rng, T0, 30, {"primary": 30, "canary": 10}, slow=5.0)
    assert g.decide(end).action == "rollback"
    later = _serve(g, rng, end + 60_000, 40, {"primary": 30, "canary": 10})
    d = g.decide(later)
    assert d.action == "none", d.reason
    assert d.numbers["canary"]["requests"] == 400  # only the last 40 s: the slow 30 s are out


def test_auto_promote_waits_for_a_clean_period_and_is_off_unless_asked():
    rng = np.random.default_rng(11)
    on, off = _guard(auto_promote=True, clean_period_s=300), _guard(clean_period_s=300)
    for g in (on, off):
        end = _serve(g, rng, T0 + 250_000, 40, {"primary": 30, "canary": 10})
        _feedback(g, rng, {"primary": 600, "canary": 200}, {"primary": 0.3, "canary": 0.3}, {"primary": 20.0, "canary": 20.0})
        assert end - T0 < 300_000 and g.decide(end).action == "none"
        assert g.decide(T0 + 300_000).action == ("promote" if g is on else "none")


def test_p99_from_the_histogram_is_within_one_bucket_of_the_exact_value():
    rng = np.random.default_rng(12)
    lat = rng.lognormal(np.log(10.0), 0.7, 20_000)
    hist = np.bincount(np.searchsorted(LATENCY_EDGES_MS, lat, side="right"), minlength=len(LATENCY_EDGES_MS) + 1)
    ratio = LATENCY_EDGES_MS[1] / LATENCY_EDGES_MS[0]
    exact = float(np.percentile(lat, 99))
    assert exact / ratio <= p_quantile_ms(hist, 0.99) <= exact * ratio
    assert p_quantile_ms(np.zeros(len(hist)), 0.99) == 0.0


def test_psi_from_counts_is_the_release_psi_of_the_same_values():
    rng = np.random.default_rng(13)
    ref = histogram_reference(rng.normal(0, 1, 5000), bins=20)
    live = rng.normal(0.3, 1.2, 3000)
    pr = PredictionReference.from_manifest({"prediction": ref})
    assert psi_from_counts(pr, pr.bin_counts(live)) == pytest.approx(psi(ref, live))


@pytest.mark.parametrize("overrides, field", [
    ({"p99_ration": 2.0}, "thresholds.p99_ration"),
    ({"alpha": 0.0}, "thresholds.alpha"),
    ({"error_margin": float("nan")}, "thresholds.error_margin"),
    ({"min_requests": 10.5}, "thresholds.min_requests"),
    ({"window_s": 5.0, "bucket_s": 10.0}, "thresholds.window_s"),
])
def test_bad_thresholds_name_their_field(overrides, field):
    with pytest.raises(InvalidArgument) as exc:
        GuardThresholds.from_overrides(overrides)
    assert exc.value.field == field


def test_thresholds_accept_whole_floats_for_counts():
    t = GuardThresholds.from_overrides({"min_requests": 50.0, "alpha": 0.01})
    assert t.min_requests == 50 and isinstance(t.min_requests, int) and t.alpha == 0.01


def test_local_counters_forget_buckets_far_behind():
    c = LocalGuardCounters(keep_buckets=3)
    c.add("canary", 1, {"requests": 5})
    c.add("canary", 10, {"requests": 1})
    assert c.read("canary", [1, 10], ["requests"]) == {"requests": 1}


def test_store_counters_let_two_workers_share_one_window(online_store):
    """Two guards (two worker processes) on one store: each sees both workers' requests."""
    def worker() -> CanaryGuard:
        return _guard(counters=StoreGuardCounters(online_store, "guard:v7", bucket_ttl_ms=200_000))

    a, b = worker(), worker()
    rng = np.random.default_rng(14)
    _serve(a, rng, T0, 15, {"primary": 30, "canary": 10}, slow=4.0)
    end = _serve(b, rng, T0 + 15_000, 15, {"primary": 30, "canary": 10}, slow=4.0)
    b.counters.flush()  # what one worker buffered is seen by another after its flush
    for g in (a, b):
        d = g.decide(end)
        assert d.numbers["canary"]["requests"] == 300
        assert d.action == "rollback" and d.reason.startswith("latency")


def test_store_counters_match_local_counters(online_store):
    rng_a, rng_b = np.random.default_rng(15), np.random.default_rng(15)
    local, shared = _guard(), _guard(counters=StoreGuardCounters(online_store, "guard:v1", bucket_ttl_ms=200_000))
    for g, rng in ((local, rng_a), (shared, rng_b)):
        end = _serve(g, rng, T0, 25, {"primary": 20, "canary": 10}, missing=0.1)
        _feedback(g, rng, {"primary": 300, "canary": 150}, {"primary": 0.3, "canary": 0.3}, {"primary": 20.0, "canary": 20.0})
    assert local.snapshot(end) == shared.snapshot(end)


# -- closed loop: the guard judging real feedback from features.closed_loop ------------------------
def _closed_loop(model, seed: int, canary_ranks_randomly: bool, requests: int, percent: float = 20.0) -> int | None:
    """Requests until rollback (None: never), deciding every 50 requests, 20 % canary."""
    from server.rollout import arm_of

    rng = np.random.default_rng(seed)
    none = PredictionReference((), ())
    g = CanaryGuard(GuardThresholds(), {"primary": none, "canary": none}, started_ms=0)
    for r in range(requests):
        u = int(rng.choice(model.user_ids))
        arm = arm_of(u, f"s{seed}", percent)
        cand = rng.choice(model.item_ids, 30, replace=False)
        shown = cand[:10] if (arm == "canary" and canary_ranks_randomly) else cand[np.argsort(-model.play_probability(u, cand))][:10]
        evs = model.respond(u, shown, r * 50, f"{seed}-{r}")
        g.record_request(arm, r * 50, latency_ms=8.0)
        g.record_feedback(arm, impressions=sum(e.type == "impression" for e in evs), plays=sum(e.type == "play" for e in evs),
                          watch_s=sum(e.value for e in evs if e.type == "play"))
        if r % 50 == 49 and g.decide(r * 50).action == "rollback":
            return r + 1
    return None


@pytest.fixture(scope="module")
def feedback_model(small_sim):
    from features.closed_loop import FeedbackModel

    return FeedbackModel.from_data_dir(small_sim, seed=2)


def test_a_canary_with_a_worse_model_is_rolled_back_within_a_bounded_number_of_requests(feedback_model):
    needed = [_closed_loop(feedback_model, s, canary_ranks_randomly=True, requests=3000) for s in range(4)]
    assert all(n is not None and n <= 2000 for n in needed), needed


def test_a_canary_with_the_same_model_is_not_rolled_back(feedback_model):
    assert [_closed_loop(feedback_model, 100 + s, canary_ranks_randomly=False, requests=2500) for s in range(4)] == [None] * 4
