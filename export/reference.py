"""Reference distributions recorded at training time, for drift detection when serving.

Per input column: quantile bin edges from training rows, the share of rows per bin and the
missing rate; for predictions: the same over the validation scores. The population
stability index (PSI) compares a serving sample with them. Pure numpy (the server uses it).

Also, since drift tests need them (monitor/drift.py): `n`, the rows the shares came from (the
shares are an estimate, and a chi-square test that took them as exact would alarm too often),
`discrete` (every value an integer: counts, where KS is wrong because of ties), and with
`sample=k` a deterministic sample of k raw values for a two-sample KS test (continuous columns
only: a 1000-value sample of every column would make a manifest ~1 MB instead of ~50 KB). Releases written
before these keys existed still work: drift falls back to a goodness-of-fit chi-square.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from features.sorted_lookup import sorted_positions

__all__ = ["SAMPLE_FILE", "PER_REQUEST", "attach_samples", "build_reference", "column_references", "histogram_reference", "psi",
           "release_reference", "request_times", "served_rows"]


def histogram_reference(values: np.ndarray, bins: int = 10, *, sample: int = 0, seed: int = 0) -> dict:
    """Quantile bins of the finite values; with sample > 0, up to `sample` of them drawn
    without replacement by a fixed seed (the same training rows give the same manifest)."""
    v = np.asarray(values, dtype=np.float64)
    missing = ~np.isfinite(v)
    x = v[~missing]
    if len(x) == 0:
        return {"edges": [], "shares": [], "missing_rate": 1.0, "n": 0}
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)
    out = {"edges": edges.tolist(), "shares": (counts / len(x)).tolist(), "missing_rate": float(missing.mean()),
           "n": len(x), "discrete": bool(np.all(x == np.round(x)))}
    if sample > 0 and not out["discrete"]:  # counts are tested with chi-square (KS assumes no ties): no sample needed
        pick = np.random.default_rng(seed).choice(len(x), size=min(sample, len(x)), replace=False)
        # float32 shortest repr: the served log holds float32, and these parse back to the same float32 values
        out["sample"] = [float(str(np.float32(a))) for a in np.sort(x[pick])]
    return out


def column_references(X: np.ndarray, columns: Sequence[str], bins: int = 10, *, sample: int = 0) -> dict[str, dict]:
    return {c: histogram_reference(X[:, j], bins, sample=sample, seed=j) for j, c in enumerate(columns)}


def psi(reference: Mapping, values: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of `values` against a reference histogram (> 0.2: drift)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    edges = np.asarray(reference["edges"], dtype=np.float64)
    ref = np.asarray(reference["shares"], dtype=np.float64)
    if len(v) == 0 or len(ref) == 0:
        return 0.0
    obs = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(ref)) / len(v)
    ref, obs = np.maximum(ref, eps), np.maximum(obs, eps)
    return float(np.sum((obs - ref) * np.log(obs / ref)))


# ---------------------------------------------------------------------------------------------
# The serving population: what the server's drift sample is drawn from.

SAMPLE_FILE = "reference.npz"  # raw samples for KS, beside the manifest (a manifest stays ~60 KB)
PER_REQUEST = 8  # sampled candidates per request: server/observe.py's RequestObserver default


def request_times(events, since: int, until: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(users, ts) of up to n requests in [since, until): events drawn uniformly (a user asks as
    often as they act), one request per user (release_lists wants unique users per batch)."""
    m = np.flatnonzero((events.ts >= since) & (events.ts < until))
    if not len(m):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.random.default_rng(seed).permutation(m)
    _, first = np.unique(events.user_id[order], return_index=True)
    pick = order[np.sort(first)][:n]
    return events.user_id[pick].astype(np.int64), events.ts[pick].astype(np.int64)


def served_rows(rt, joiner, used, user_set, events, kind: str, items, users: np.ndarray, ts: np.ndarray, *,
                per_request: int = PER_REQUEST, policy=None, new=None, seed: int = 0, ranker: str | None = None) -> dict:
    """The rows the server's drift sample holds for requests (users, ts), users unique: each
    request's candidates by the server's own rule (export.candidates.candidate_union: the
    release's ANN list plus new items by content, fresh and popular items, seen and unpublished
    items removed), `per_request` of them drawn uniformly, with the ranker inputs the batch path
    computes (export.device.lists.teacher_matrix, proven equal to serving) and the ranker's score.
    Returns {"users", "ts" (per request), "X", "scores", "request" (row -> request index),
    "sources", "n_candidates" (per request)}. numpy + ONNX Runtime (imported here: the rest of
    this module stays numpy-only)."""
    from export.candidates import CandidatePolicy, NewItems, candidate_union
    from export.device.lists import ReleaseLists, release_lists, teacher_matrix
    from features.history import engagement_mask, history_at

    policy = (policy or CandidatePolicy()).for_release(rt.release.meta.candidates)  # the release's quotas, as the server
    new = new if new is not None else NewItems.of(rt, items)
    lists = release_lists(rt, joiner, user_set, events, kind, items, users, ts, k=policy.retrieve_k)
    u_all, t_all = lists.users, lists.cut
    hist = history_at(events, kind, u_all, t_all, rt.item_item.history_len) if policy.n_item_item and rt.item_item is not None else None
    pos = sorted_positions(u_all, events.user_id)
    mine = (u_all[pos] == events.user_id) if len(u_all) else np.zeros(len(events.user_id), bool)
    eng = engagement_mask(events, kind) & mine
    eng &= events.ts < (t_all[pos] if len(u_all) else 0)
    seen_u, seen_i = pos[eng], events.item_id[eng].astype(np.int64)
    order = np.argsort(seen_u, kind="stable")
    bounds = np.searchsorted(seen_u[order], np.arange(len(u_all) + 1))
    rng = np.random.default_rng(seed)
    cands, picks, srcs = [], [], []
    for r in range(len(u_all)):
        blocked = np.unique(seen_i[order[bounds[r]:bounds[r + 1]]])
        c = candidate_union(rt, lists.user_emb[r], items, new, blocked, int(t_all[r]), policy, ann_ids=lists.ids[r],
                            history=hist[r] if hist is not None else None)
        n = len(c.ids)
        pk = np.arange(n) if n <= per_request else np.sort(rng.choice(n, per_request, replace=False))
        cands.append(c.ids)
        picks.append(pk)
        srcs.append(c.source[pk])
    if rt.inputs.uses_retrieval:  # list-relative columns need the whole list: compute it, keep the picks
        X_all = teacher_matrix(rt, joiner, used, events, kind, items, ReleaseLists(u_all, t_all, lists.user_emb, cands), new)
        offs = np.r_[0, np.cumsum([len(c) for c in cands])[:-1]].astype(np.int64) if cands else np.zeros(0, np.int64)
        X = X_all[np.concatenate([o + pk for o, pk in zip(offs, picks)])] if cands else X_all
    else:
        X = teacher_matrix(rt, joiner, used, events, kind, items, ReleaseLists(u_all, t_all, lists.user_emb, [c[pk] for c, pk in zip(cands, picks)]))
    X = np.asarray(X, dtype=np.float32)
    scores = rt.final_scores(X, ranker).reshape(-1) if len(X) else np.zeros(0, np.float32)  # what the server serves
    req = np.repeat(np.arange(len(u_all)), [len(p) for p in picks]) if picks else np.zeros(0, np.int64)
    return {"users": u_all, "ts": t_all, "X": X, "scores": np.asarray(scores, np.float32), "request": req,
            "sources": np.concatenate(srcs) if srcs else np.zeros(0, np.int8), "n_candidates": np.asarray([len(c) for c in cands])}


def build_reference(X: np.ndarray, columns: Sequence[str], scores: np.ndarray, *, population: dict, sample: int = 2000,
                    bins: int = 10) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest reference, arrays for SAMPLE_FILE): histograms in the manifest, raw samples
    (continuous columns and the predictions, up to `sample` each) in the file, named
    `features` (sample, columns; NaN where a column keeps none) and `prediction`."""
    feats = column_references(X, columns, bins, sample=sample)
    pred = histogram_reference(scores, bins=20, sample=sample)
    S = np.full((sample, len(columns)), np.nan, dtype=np.float32)
    sampled = []
    for j, c in enumerate(columns):
        s = feats[c].pop("sample", None)
        if s:
            S[:len(s), j] = np.asarray(s, np.float32)
            sampled.append(c)
    p = np.asarray(pred.pop("sample", []), np.float32)
    ref = {"features": feats, "prediction": pred, "population": dict(population),
           "samples": {"file": SAMPLE_FILE, "columns": sampled, "size": int(sample)}}
    return ref, {"features": S, "prediction": p, "columns": np.asarray(list(columns))}


def attach_samples(reference: Mapping, arrays: Mapping[str, np.ndarray]) -> dict:
    """The reference with its raw samples back inline (`sample` lists), as monitor.drift reads it."""
    out = {**reference, "features": {c: dict(h) for c, h in reference["features"].items()},
           "prediction": dict(reference["prediction"]) if reference.get("prediction") else reference.get("prediction")}
    cols = [str(c) for c in arrays["columns"].tolist()]
    S = np.asarray(arrays["features"], np.float32)
    for c in reference.get("samples", {}).get("columns", ()):
        if c in out["features"] and c in cols:
            v = S[:, cols.index(c)]
            out["features"][c]["sample"] = v[np.isfinite(v)].tolist()
    p = np.asarray(arrays.get("prediction", []), np.float32)
    if out.get("prediction") and len(p):
        out["prediction"]["sample"] = p.tolist()
    return out


def release_reference(release) -> dict | None:
    """A release's reference as monitor.drift reads it: the manifest's histograms with the raw
    samples of SAMPLE_FILE attached (older releases keep theirs inline, or none). None when the
    release carries no reference."""
    ref = release.manifest.get("reference")
    if not ref or not ref.get("features"):
        return None
    smp = ref.get("samples")
    if not smp:
        return dict(ref)
    with np.load(release.file(smp["file"]), allow_pickle=False) as z:
        return attach_samples(ref, {k: z[k] for k in z.files})
