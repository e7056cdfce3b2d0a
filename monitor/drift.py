"""Drift of served features and predictions against a release's reference histograms.

Pure numpy + scipy.stats, no I/O: `parity monitor drift` feeds it rows read from the served
log, and the server feeds `SlidingDrift` the rows it logs, so both compute the same figures.

Per column (and for the predictions), against the reference `{edges, shares, missing_rate}`
written by `export.reference` at training time (optionally with `n`, `discrete` and a raw
`sample`):

- effect sizes on the reference bins: PSI, KL(live || reference) and the Jensen-Shannon
  distance (base 2, so it lies in [0, 1]);
- a p-value: two-sample KS against the reference's raw sample when the release carries one
  and the column is continuous; otherwise chi-square on the bin counts (a 2 x bins
  homogeneity test when the reference says how many rows its shares came from, since the
  reference shares are themselves an estimate; goodness of fit against the shares when an
  older release does not). Count-like columns always use chi-square: KS assumes no ties;
- the p-values of the feature columns are adjusted with Benjamini-Hochberg
  (scipy.stats.false_discovery_control), so 50 columns checked at once do not each get a
  1 % chance to alarm; the prediction is one test of its own, compared unadjusted;
- the missing rate (NaN), live against reference, with a one-sided binomial test.

Why an alarm needs both an effect size and a p-value: with a few thousand rows a chi-square
test finds a difference nobody cares about (p tiny, PSI 0.01), and with a few dozen rows a
large PSI is noise (PSI of 0.3 with p = 0.4). A column drifts when (PSI >= psi or JS >= js)
and its adjusted p-value < alpha, or when its missing rate rose by more than missing_rise
(and that rise is significant at alpha). Below min_rows live rows nothing alarms.

`SlidingDrift` keeps, per time bucket, bin counts against the reference edges (exact and
mergeable across processes: counts add) and a bounded reservoir of raw rows for the KS test,
so its memory is O(buckets x (columns x bins + reservoir)) whatever the traffic.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "PREDICTION",
    "DriftPoll",
    "DriftReport",
    "DriftThresholds",
    "FeatureDrift",
    "SlidingDrift",
    "bin_counts",
    "column_drift",
    "drift_report",
]

PREDICTION = "prediction"  # the name the predictions' entry carries in a report


def _stats():
    """scipy.stats, imported on first use: `parity`'s argument parser imports this module for
    the default thresholds, and scipy would add half a second to every command."""
    from scipy import stats

    return stats


@dataclass(frozen=True)
class DriftThresholds:
    """When a column counts as drifted. Defaults chosen on calibration seeds (bench/drift_calibrate.py,
    bench/results/drift_calibration.json: simulator seeds 100-102, never the reported ones):
    the setting with a false-alarm rate <= 5 % per column-window on traffic without a shift that
    detects the most planted shifts, with a 6 h window against a rolling 48 h served-log
    reference (`parity monitor drift --reference served:48h --window 6h`): PSI >= 0.4 or JS >=
    0.125 (base 2) with BH-adjusted p < 0.001. The previous hand-picked 0.2 / 0.1 / 0.01 alarmed
    on 28-38 % of column-windows against the release's reference and 7 % against the rolling
    one. A missing rate up by 5 points, and 200 live rows before anything may alarm."""

    psi: float = 0.4
    js: float = 0.125
    alpha: float = 0.001
    missing_rise: float = 0.05
    min_rows: int = 200
    eps: float = 1e-4  # share floor for PSI and KL (an empty bin would make them infinite)

    def __post_init__(self) -> None:
        for name in ("psi", "js", "alpha", "missing_rise", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"DriftThresholds.{name} must be a number, got {type(v).__name__} {v!r}")
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"DriftThresholds.{name} must be a finite number >= 0, got {v!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"DriftThresholds.alpha must be in (0, 1), got {self.alpha!r}")
        if not 0 < self.eps < 1:
            raise ValueError(f"DriftThresholds.eps must be in (0, 1), got {self.eps!r}")
        if isinstance(self.min_rows, bool) or not isinstance(self.min_rows, int):
            raise TypeError(f"DriftThresholds.min_rows must be an int, got {type(self.min_rows).__name__} {self.min_rows!r}")
        if self.min_rows < 1:
            raise ValueError(f"DriftThresholds.min_rows must be >= 1, got {self.min_rows}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FeatureDrift:
    """One column's figures. p_adjusted is the BH-adjusted p-value (the prediction's is its own
    p-value). Statistics are None when they could not be computed (too few rows, no reference
    bins). `counts`/`reference_shares`/`edges` are kept for plots, not for the JSON."""

    name: str
    rows: int  # live rows, missing included
    present: int  # live rows with a value
    psi: float | None
    kl: float | None
    js: float | None
    test: str | None  # "ks" | "chi2" | "chi2_gof" | None
    p_value: float | None
    p_adjusted: float | None
    missing_rate: float | None
    reference_missing_rate: float
    missing_p: float | None
    drifted: bool
    reasons: tuple[str, ...]  # "psi", "js", "missing"
    edges: tuple[float, ...] = field(repr=False, default=())
    counts: tuple[int, ...] = field(repr=False, default=())
    reference_shares: tuple[float, ...] = field(repr=False, default=())

    def to_dict(self) -> dict:
        keys = ("rows", "present", "psi", "kl", "js", "test", "p_value", "p_adjusted", "missing_rate",
                "reference_missing_rate", "missing_p", "drifted")
        out = {k: _finite(getattr(self, k)) for k in keys}
        out["reasons"] = list(self.reasons)
        return out


@dataclass(frozen=True)
class DriftReport:
    rows: int
    features: tuple[FeatureDrift, ...]
    prediction: FeatureDrift | None
    thresholds: DriftThresholds

    @property
    def drifted(self) -> tuple[str, ...]:
        """Names of drifted columns in column order, then PREDICTION if the predictions drifted."""
        names = [f.name for f in self.features if f.drifted]
        if self.prediction is not None and self.prediction.drifted:
            names.append(PREDICTION)
        return tuple(names)

    def feature(self, name: str) -> FeatureDrift:
        if name == PREDICTION and self.prediction is not None:
            return self.prediction
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no column {name!r} in this drift report")

    def to_dict(self) -> dict:
        return {"rows": self.rows, "drifted": list(self.drifted), "n_drifted": len(self.drifted),
                "thresholds": self.thresholds.to_dict(), "features": {f.name: f.to_dict() for f in self.features},
                "prediction": self.prediction.to_dict() if self.prediction is not None else None}

    def to_json(self) -> str:
        """One line of JSON (NaN and infinities written as null), keys sorted."""
        return json.dumps(self.to_dict(), sort_keys=True)


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _edges(ref: Mapping) -> np.ndarray:
    return np.asarray(ref.get("edges", ()), dtype=np.float64)


def bin_counts(ref: Mapping, values: np.ndarray) -> tuple[np.ndarray, int]:
    """(counts per reference bin, missing count) of `values`: the bins of export.reference
    (value v falls in bin searchsorted(edges, v, side="right")). NaN/inf are missing."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    n_bins = len(ref.get("shares", ()))
    if n_bins == 0:
        return np.zeros(0, dtype=np.int64), int((~ok).sum())
    idx = np.searchsorted(_edges(ref), v[ok], side="right")
    return np.bincount(idx, minlength=n_bins).astype(np.int64), int((~ok).sum())


def _effect_sizes(obs_counts: np.ndarray, ref_shares: np.ndarray, eps: float) -> tuple[float, float, float]:
    """(PSI, KL(live||ref), JS distance base 2) on the reference bins. PSI floors shares at eps
    exactly as export.reference.psi does (one definition of the number the gauges show)."""
    obs = obs_counts / obs_counts.sum()
    o, r = np.maximum(obs, eps), np.maximum(ref_shares, eps)
    psi = float(np.sum((o - r) * np.log(o / r)))
    on, rn = o / o.sum(), r / r.sum()
    kl = float(np.sum(on * np.log(on / rn)))
    from scipy.spatial.distance import jensenshannon

    js = float(jensenshannon(obs, ref_shares / ref_shares.sum(), base=2))
    return psi, kl, js


def _is_discrete(ref: Mapping, sample: np.ndarray | None) -> bool:
    if "discrete" in ref:
        return bool(ref["discrete"])
    return sample is not None and len(sample) > 0 and bool(np.all(sample == np.round(sample)))


def _chi2(obs_counts: np.ndarray, ref: Mapping, eps: float) -> tuple[str, float]:
    shares = np.asarray(ref["shares"], dtype=np.float64)
    n_ref = ref.get("n")
    if n_ref:  # the reference shares are an estimate from n_ref rows: test homogeneity of two samples
        ref_counts = np.round(shares * float(n_ref))
        table = np.vstack([obs_counts.astype(np.float64), ref_counts])
        keep = table.sum(axis=0) > 0
        if keep.sum() < 2:
            return "chi2", 1.0
        return "chi2", float(_stats().chi2_contingency(table[:, keep], correction=False).pvalue)
    keep = shares > 0
    if keep.sum() < 2:
        return "chi2_gof", 1.0
    n = obs_counts.sum()
    lost = obs_counts[~keep].sum()
    if lost > 0:  # live rows in a bin the reference never saw: impossible under the null
        return "chi2_gof", 0.0
    exp = np.maximum(shares[keep], eps)
    exp = exp / exp.sum() * n
    return "chi2_gof", float(_stats().chisquare(obs_counts[keep], exp).pvalue)


def column_drift(name: str, ref: Mapping, counts: np.ndarray, missing: int, live_sample: np.ndarray | None,
                 thresholds: DriftThresholds) -> FeatureDrift:
    """One column's figures from its live bin counts (and, for KS, a uniform sample of its live
    values) with the raw p-value in p_adjusted too: `drift_report` adjusts across columns and
    then decides. Exposed so the sliding window and the batch report share this code."""
    counts = np.asarray(counts, dtype=np.int64)
    present = int(counts.sum())
    rows = present + int(missing)
    ref_miss = float(ref.get("missing_rate", 0.0))
    shares = np.asarray(ref.get("shares", ()), dtype=np.float64)
    psi = kl = js = p = None
    test = None
    if len(shares) and present >= thresholds.min_rows and shares.sum() > 0:
        psi, kl, js = _effect_sizes(counts.astype(np.float64), shares, thresholds.eps)
        sample = np.asarray(ref["sample"], dtype=np.float32).astype(np.float64) if ref.get("sample") else None
        live = None if live_sample is None else np.asarray(live_sample, dtype=np.float32).astype(np.float64)
        live = None if live is None else live[np.isfinite(live)]
        if sample is not None and live is not None and len(live) >= 2 and len(sample) >= 2 and not _is_discrete(ref, sample):
            test, p = "ks", float(_stats().ks_2samp(live, sample).pvalue)
        else:
            test, p = _chi2(counts, ref, thresholds.eps)
    miss_rate = missing_p = None
    if rows > 0:
        miss_rate = missing / rows
        if rows >= thresholds.min_rows:
            missing_p = 0.0 if ref_miss <= 0 and missing > 0 else float(
                _stats().binomtest(int(missing), rows, min(max(ref_miss, 1e-12), 1.0), alternative="greater").pvalue)
    return FeatureDrift(name, rows, present, psi, kl, js, test, p, p, miss_rate, ref_miss, missing_p, False, (),
                        tuple(_edges(ref).tolist()), tuple(int(c) for c in counts), tuple(shares.tolist()))


def _decide(f: FeatureDrift, p_adj: float | None, th: DriftThresholds) -> FeatureDrift:
    reasons = []
    if p_adj is not None and p_adj < th.alpha:
        if f.psi is not None and f.psi >= th.psi:
            reasons.append("psi")
        if f.js is not None and f.js >= th.js:
            reasons.append("js")
    if (f.missing_rate is not None and f.missing_p is not None and f.missing_rate - f.reference_missing_rate > th.missing_rise
            and f.missing_p < th.alpha):
        reasons.append("missing")
    return FeatureDrift(f.name, f.rows, f.present, f.psi, f.kl, f.js, f.test, f.p_value, p_adj, f.missing_rate,
                        f.reference_missing_rate, f.missing_p, bool(reasons), tuple(reasons), f.edges, f.counts, f.reference_shares)


def _finish(raw: list[FeatureDrift], pred: FeatureDrift | None, rows: int, th: DriftThresholds) -> DriftReport:
    ps = np.asarray([f.p_value for f in raw if f.p_value is not None], dtype=np.float64)
    adj = iter(_stats().false_discovery_control(ps, method="bh").tolist() if len(ps) else [])
    feats = tuple(_decide(f, next(adj) if f.p_value is not None else None, th) for f in raw)
    return DriftReport(rows, feats, _decide(pred, pred.p_value, th) if pred is not None else None, th)


def _check_columns(reference: Mapping, columns: Sequence[str]) -> Mapping:
    feats = reference.get("features")
    if not isinstance(feats, Mapping):
        raise ValueError("the reference has no per-column histograms ('features')")  # noqa: TRY004 (bad input: exit 2)
    absent = [c for c in columns if c not in feats]
    if absent:
        raise ValueError(f"the reference has no histogram for {len(absent)} column(s): {', '.join(absent[:5])}"
                         + (" ..." if len(absent) > 5 else ""))
    if PREDICTION in columns:
        raise ValueError(f"a feature column may not be named {PREDICTION!r} (the predictions' entry)")
    return feats


def drift_report(reference: Mapping, columns: Sequence[str], X: np.ndarray, predictions: np.ndarray | None = None,
                 thresholds: DriftThresholds | None = None) -> DriftReport:
    """Drift of the rows X (n, len(columns)), NaN = missing, and of `predictions` (n,) against a
    release's `manifest["reference"]` ({"features": {column: histogram}, "prediction": histogram})."""
    th = thresholds or DriftThresholds()
    feats = _check_columns(reference, columns)
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != len(columns):
        raise ValueError(f"X must be (rows, {len(columns)}) for {len(columns)} columns, got shape {X.shape}")
    raw = []
    for j, c in enumerate(columns):
        counts, miss = bin_counts(feats[c], X[:, j])
        raw.append(column_drift(c, feats[c], counts, miss, X[:, j], th))
    pred = None
    if predictions is not None and reference.get("prediction"):
        p = np.asarray(predictions).reshape(-1)
        counts, miss = bin_counts(reference["prediction"], p)
        pred = column_drift(PREDICTION, reference["prediction"], counts, miss, p, th)
    return _finish(raw, pred, int(X.shape[0]), th)


@dataclass(frozen=True)
class DriftPoll:
    """One look at the sliding window: the report, the names that drift now and did not at the
    previous poll (alert events), and those that drifted then and no longer do."""

    report: DriftReport
    new_alerts: tuple[str, ...]
    cleared: tuple[str, ...]


class _Bucket:
    __slots__ = ("counts", "missing", "pred_counts", "pred_missing", "pred_sample", "rows", "sample", "seen")

    def __init__(self, n_cols: int, n_bins: int, n_pred_bins: int, reservoir: int) -> None:
        self.counts = np.zeros((n_cols, n_bins), dtype=np.int64)
        self.missing = np.zeros(n_cols, dtype=np.int64)
        self.pred_counts = np.zeros(n_pred_bins, dtype=np.int64)
        self.pred_missing = 0
        self.rows = 0
        self.seen = 0  # rows offered to the reservoir
        self.sample = np.full((reservoir, n_cols), np.nan, dtype=np.float32)
        self.pred_sample = np.full(reservoir, np.nan, dtype=np.float32)


class SlidingDrift:
    """Drift over the last `window_ms`, kept as `buckets` time buckets (the window moves a
    bucket at a time). Per bucket: bin counts of every column against the reference edges
    (exact, and mergeable: counts from several processes add up) and a reservoir of at most
    `reservoir` raw rows (uniform within the bucket), read only when the reference carries a
    raw sample for KS. At report time each bucket contributes a share of its reservoir
    proportional to its row count, so the pooled sample is uniform over the window.

    Not thread-safe: the server calls it from its event loop. Time is event time in ms (the
    request's as-of time), never the wall clock, so a replay computes the same figures."""

    def __init__(self, reference: Mapping, columns: Sequence[str], *, window_ms: int = 3_600_000, buckets: int = 12,
                 thresholds: DriftThresholds | None = None, reservoir: int = 512, seed: int = 0) -> None:
        for name, v, lo in (("window_ms", window_ms, 1), ("buckets", buckets, 1), ("reservoir", reservoir, 0)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"SlidingDrift {name} must be an int, got {type(v).__name__} {v!r}")
            if v < lo:
                raise ValueError(f"SlidingDrift {name} must be >= {lo}, got {v}")
        if window_ms % buckets:
            raise ValueError(f"SlidingDrift window_ms ({window_ms}) must be a multiple of buckets ({buckets})")
        self._feats = _check_columns(reference, columns)
        self._reference = reference
        self.columns = tuple(columns)
        self.thresholds = thresholds or DriftThresholds()
        self.window_ms, self.n_buckets, self.bucket_ms = window_ms, buckets, window_ms // buckets
        self._reservoir = reservoir
        self._rng = np.random.default_rng(seed)
        self._n_bins = max((len(self._feats[c].get("shares", ())) for c in self.columns), default=0)
        self._pred_ref = reference.get("prediction") or None
        self._n_pred_bins = len(self._pred_ref.get("shares", ())) if self._pred_ref else 0
        self._buckets: dict[int, _Bucket] = {}
        self._alerting: frozenset[str] = frozenset()
        self._needs_sample = any(self._feats[c].get("sample") for c in self.columns) or bool(self._pred_ref and self._pred_ref.get("sample"))
        self.pace: Callable[[], None] | None = None  # called between columns: a server running this beside requests yields there

    def add(self, X: np.ndarray, predictions: np.ndarray | None, ts_ms: int | np.ndarray) -> None:
        """Count rows X (n, columns) with their predictions (n,) at time(s) ts_ms (one per row or one for all)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != len(self.columns):
            raise ValueError(f"X must be (rows, {len(self.columns)}), got shape {X.shape}")
        n = X.shape[0]
        ts = np.broadcast_to(np.asarray(ts_ms, dtype=np.int64), (n,))
        p = None if predictions is None else np.asarray(predictions, dtype=np.float32).reshape(-1)
        if p is not None and len(p) != n:
            raise ValueError(f"predictions must have one value per row ({n}), got {len(p)}")
        b_of = ts // self.bucket_ms
        for b in np.unique(b_of).tolist():
            sel = b_of == b
            self._add_bucket(int(b), X[sel], None if p is None else p[sel])
        self._expire(int(b_of.max()) if n else None)

    def _add_bucket(self, b: int, X: np.ndarray, p: np.ndarray | None) -> None:
        bk = self._buckets.get(b)
        if bk is None:
            bk = self._buckets[b] = _Bucket(len(self.columns), self._n_bins, self._n_pred_bins, self._reservoir if self._needs_sample else 0)
        for j, c in enumerate(self.columns):
            if self.pace is not None:
                self.pace()
            counts, miss = bin_counts(self._feats[c], X[:, j])
            bk.counts[j, :len(counts)] += counts
            bk.missing[j] += miss
        if p is not None and self._pred_ref:
            counts, miss = bin_counts(self._pred_ref, p)
            bk.pred_counts += counts
            bk.pred_missing += miss
        bk.rows += len(X)
        R = bk.sample.shape[0]
        if R:  # Algorithm R, vectorised: row k (0-based, over the bucket) lands in slot k, or in a slot < R with chance R/(k+1)
            k = bk.seen + np.arange(len(X))
            slot = np.where(k < R, k, self._rng.integers(0, k + 1))
            keep = slot < R
            bk.sample[slot[keep]] = X[keep]  # several rows for one slot: the last wins, as in the sequential algorithm
            if p is not None:
                bk.pred_sample[slot[keep]] = p[keep]
            bk.seen += len(X)

    def _expire(self, newest: int | None) -> None:
        if newest is None:
            return
        for b in [b for b in self._buckets if b <= newest - self.n_buckets]:
            del self._buckets[b]

    def report(self, now_ms: int) -> DriftReport:
        """Drift of the rows in the buckets of the window ending at now_ms (the bucket holding
        now_ms and the buckets-1 before it); buckets older than that are dropped for good."""
        now_b = int(now_ms) // self.bucket_ms
        self._expire(now_b)
        live = [bk for b, bk in sorted(self._buckets.items()) if now_b - self.n_buckets < b <= now_b]
        rows = sum(bk.rows for bk in live)
        pooled, pred_pooled = self._pooled_sample(live)
        raw = []
        for j, c in enumerate(self.columns):
            if self.pace is not None:
                self.pace()
            ref = self._feats[c]
            nb = len(ref.get("shares", ()))
            counts = sum((bk.counts[j, :nb] for bk in live), np.zeros(nb, dtype=np.int64))
            miss = int(sum(int(bk.missing[j]) for bk in live))
            raw.append(column_drift(c, ref, counts, miss, pooled[:, j] if pooled is not None else None, self.thresholds))
        pred = None
        if self._pred_ref and any(bk.pred_counts.sum() + bk.pred_missing for bk in live):
            counts = sum((bk.pred_counts for bk in live), np.zeros(self._n_pred_bins, dtype=np.int64))
            miss = int(sum(bk.pred_missing for bk in live))
            pred = column_drift(PREDICTION, self._pred_ref, counts, miss, pred_pooled, self.thresholds)
        return _finish(raw, pred, rows, self.thresholds)

    def _pooled_sample(self, live: list[_Bucket]) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not self._needs_sample or not live:
            return None, None
        # the smallest kept fraction across buckets, applied to every bucket: a uniform sample of the window
        frac = min(min(bk.seen, bk.sample.shape[0]) / bk.seen for bk in live if bk.seen) if any(bk.seen for bk in live) else 0.0
        parts, pparts = [], []
        for bk in live:
            have = min(bk.seen, bk.sample.shape[0])
            take = min(have, round(frac * bk.seen))
            # random slots, not the first ones: slot i only ever holds row i or a later row
            pick = np.sort(self._rng.choice(have, size=take, replace=False)) if take < have else np.arange(have)
            parts.append(bk.sample[pick])
            pparts.append(bk.pred_sample[pick])
        return np.concatenate(parts), np.concatenate(pparts)

    # -- sharing windows between workers: counts add, reservoirs merge by weighted sampling --

    def _compatible(self, other: "SlidingDrift") -> None:
        if not isinstance(other, SlidingDrift):
            raise TypeError(f"can only merge a SlidingDrift, got {type(other).__name__}")
        if (other.columns, other.bucket_ms, other._n_bins, other._n_pred_bins) != (self.columns, self.bucket_ms, self._n_bins, self._n_pred_bins):
            raise ValueError("cannot merge SlidingDrift windows of different columns, bucket lengths or reference bins")

    def _merge_bucket(self, b: int, o: _Bucket) -> None:
        mine = self._buckets.get(b)
        if mine is None:
            mine = self._buckets[b] = _Bucket(len(self.columns), self._n_bins, self._n_pred_bins, self._reservoir if self._needs_sample else 0)
        R = mine.sample.shape[0]
        have_a, have_b = min(mine.seen, R), min(o.seen, o.sample.shape[0])
        if R and have_a + have_b:
            # a uniform sample of the union: each slot comes from side A with chance seen_A / (seen_A + seen_B),
            # without replacement within each side's (itself uniform) reservoir
            take = min(R, have_a + have_b)
            from_a = int(self._rng.hypergeometric(mine.seen, o.seen, take)) if mine.seen and o.seen else (take if mine.seen else 0)
            from_a = min(max(from_a, take - have_b), have_a)
            from_b = min(take - from_a, have_b)
            ia = self._rng.choice(have_a, from_a, replace=False) if from_a < have_a else np.arange(have_a)
            ib = self._rng.choice(have_b, from_b, replace=False) if from_b < have_b else np.arange(have_b)
            X = np.concatenate([mine.sample[ia], o.sample[ib]])
            P = np.concatenate([mine.pred_sample[ia], o.pred_sample[ib]])
            mine.sample[:] = np.nan
            mine.pred_sample[:] = np.nan
            mine.sample[:len(X)] = X
            mine.pred_sample[:len(X)] = P
        mine.counts += o.counts
        mine.missing += o.missing
        mine.pred_counts += o.pred_counts
        mine.pred_missing += o.pred_missing
        mine.rows += o.rows
        mine.seen += o.seen

    def merge(self, other: "SlidingDrift") -> None:
        """Add another worker's window (same reference, columns and bucket length) into this
        one: bin counts and missing counts add; each bucket's reservoir becomes a uniform sample
        of both workers' rows of that bucket (rows drawn from each side in proportion to the
        rows it saw). `other` is left unchanged."""
        self._compatible(other)
        for b, o in sorted(other._buckets.items()):
            self._merge_bucket(b, o)
        if self._buckets:
            self._expire(max(self._buckets))

    def counts(self) -> dict:
        """The window's state as plain data (JSON-able: lists and numbers), for a shared store:
        per bucket its counts, missing counts, rows, rows seen by the reservoir and the reservoir
        (NaN written as None). `SlidingDrift.from_counts(reference, columns, state)` rebuilds it."""
        def plain(a: np.ndarray) -> list:
            return [None if isinstance(v, float) and not math.isfinite(v) else v for v in a.reshape(-1).tolist()]

        buckets = []
        for b, bk in sorted(self._buckets.items()):
            kept = min(bk.seen, bk.sample.shape[0])
            buckets.append({"bucket": b, "rows": bk.rows, "seen": bk.seen, "counts": bk.counts.tolist(), "missing": bk.missing.tolist(),
                            "pred_counts": bk.pred_counts.tolist(), "pred_missing": bk.pred_missing,
                            "sample": [plain(r) for r in bk.sample[:kept]], "pred_sample": plain(bk.pred_sample[:kept])})
        return {"columns": list(self.columns), "window_ms": self.window_ms, "buckets_n": self.n_buckets, "reservoir": self._reservoir,
                "buckets": buckets}

    @classmethod
    def from_counts(cls, reference: Mapping, columns: Sequence[str], state: Mapping, *, thresholds: DriftThresholds | None = None,
                    seed: int = 0) -> "SlidingDrift":
        """A window rebuilt from `counts()` (the same reference and columns)."""
        if list(state.get("columns", ())) != list(columns):
            raise ValueError("the stored window was kept for other columns")
        sd = cls(reference, columns, window_ms=int(state["window_ms"]), buckets=int(state["buckets_n"]), thresholds=thresholds,
                 reservoir=int(state["reservoir"]), seed=seed)
        for e in state["buckets"]:
            bk = _Bucket(len(sd.columns), sd._n_bins, sd._n_pred_bins, sd._reservoir if sd._needs_sample else 0)
            counts = np.asarray(e["counts"], dtype=np.int64)
            if counts.shape != bk.counts.shape or len(e["pred_counts"]) != len(bk.pred_counts):
                raise ValueError("the stored window's bins do not match the reference")
            bk.counts[:] = counts
            bk.missing[:] = np.asarray(e["missing"], dtype=np.int64)
            bk.pred_counts[:] = np.asarray(e["pred_counts"], dtype=np.int64)
            bk.pred_missing, bk.rows, bk.seen = int(e["pred_missing"]), int(e["rows"]), int(e["seen"])
            kept = min(len(e["sample"]), bk.sample.shape[0])
            if kept:
                bk.sample[:kept] = np.asarray(e["sample"][:kept], dtype=np.float64).astype(np.float32)
                bk.pred_sample[:kept] = np.asarray(e["pred_sample"][:kept], dtype=np.float64).astype(np.float32)
            sd._buckets[int(e["bucket"])] = bk
        return sd

    def poll(self, now_ms: int) -> DriftPoll:
        """The report at now_ms plus what changed since the previous poll: `new_alerts` are the
        names to write an alert event for (a name that cleared and drifts again alerts again)."""
        rep = self.report(now_ms)
        now = frozenset(rep.drifted)
        order = {n: i for i, n in enumerate((*self.columns, PREDICTION))}
        new = tuple(sorted(now - self._alerting, key=order.__getitem__))
        cleared = tuple(sorted(self._alerting - now, key=order.__getitem__))
        self._alerting = now
        return DriftPoll(rep, new, cleared)
