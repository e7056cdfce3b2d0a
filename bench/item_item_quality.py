"""How the sparse item-item model (features.item_item) is chosen, and what it gives up against the
dense EASE it approximates: NDCG@10 / recall@10 of the item-item model alone on MovieLens 100K
VALIDATION lists, never the test split.

    PARITY_MOVIELENS=/path/to/ml-100k python -m bench.item_item_quality --out bench/results/item_item_quality.json

For each seed: the published protocol's 80/20 split (models.protocol.protocol_split, seed), its
training 80% split again 87.5/12.5 (seed + 1), the model fitted on the 87.5% and every user
ranking all items unseen there by the model's score for their last `history_len` engaged
items (features.history.history_at, as training, eval and the server do). The grid: the
neighbourhood size m and lambda of the sparse fit, and lambda of the dense EASE (the exact
closed form, here only as the reference). The defaults in features/item_item.py are the
grid's best mean NDCG@10 over the seeds.

    PARITY_MOVIELENS=... python -m bench.item_item_quality --two-stage 200 800 --out bench/results/item_item_two_stage.json

measures instead what the ranker does with the item-item column: pipeline.protocol_eval's
published protocol with holdout="valid" (a whole release trained on the 87.5%, the two-tower's
lists re-ranked by the int8 student and the teacher), per seed and lambda, with the default
neighbourhood size.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from features.eventlog import EventLog
from features.history import HISTORY_LEN, history_at
from features.item_item import ItemItem, fit_item_item
from features.movielens import import_movielens
from models.protocol import ProtocolSplit, full_ranking_metrics, protocol_split

__all__ = ["dense_ease", "validation_split", "evaluate", "main"]


def dense_ease(vocab: np.ndarray, user_ids: np.ndarray, item_ids: np.ndarray, l2: float, history_len: int = HISTORY_LEN) -> ItemItem:
    """The closed-form EASE (B = -P / diag(P), P = (X'X + lambda I)^-1, zero diagonal) over the
    whole catalogue, stored with every nonzero weight: the reference the sparse fit approximates."""
    vocab = np.unique(np.asarray(vocab, np.int64))
    n = len(vocab)
    col = np.searchsorted(vocab, item_ids)
    ok = (col < n) & (vocab[np.minimum(col, n - 1)] == item_ids)
    _, u = np.unique(np.asarray(user_ids)[ok], return_inverse=True)
    X = np.zeros((int(u.max()) + 1, n))
    X[u, col[ok]] = 1.0
    P = np.linalg.inv(X.T @ X + l2 * np.eye(n))
    B = (-P / np.diag(P)[None, :]).astype(np.float32)
    np.fill_diagonal(B, 0.0)
    src, dst = np.nonzero(B)
    return ItemItem(vocab, np.r_[0, np.cumsum(np.bincount(src, minlength=n))].astype(np.int64), dst.astype(np.int32),
                    B[src, dst], float(l2), history_len, max(n - 1, 1))


def validation_split(events, seed: int) -> ProtocolSplit:
    return protocol_split(protocol_split(events, seed).train_events, seed + 1, test_frac=0.125)


def evaluate(model: ItemItem, split: ProtocolSplit) -> dict[str, float]:
    t_end = int(split.train_events.ts.max()) + 1
    H = history_at(split.train_events, "movielens", split.user_ids, t_end, model.history_len)
    S = np.stack([np.where(m, -np.inf, v) for v, m in (model.scores(h, split.item_ids) for h in H)])
    return full_ranking_metrics(split, lambda ub: S[ub])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/item_item_quality.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--neighbours", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--l2", type=float, nargs="+", default=[50.0, 200.0, 800.0])
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    ap.add_argument("--two-stage", type=float, nargs="+", default=None, metavar="L2",
                    help="instead: the published protocol's validation of whole releases, per lambda")
    ap.add_argument("--profile", default="default")
    a = ap.parse_args(argv)
    src = os.environ.get("PARITY_MOVIELENS")
    if not src:
        raise SystemExit("set PARITY_MOVIELENS to the ml-100k folder")
    if a.two_stage:
        return _two_stage(src, a)
    rows = []
    with tempfile.TemporaryDirectory(prefix="parity-ii-quality-") as tmp:
        import_movielens(src, Path(tmp) / "ml")
        events = EventLog(Path(tmp) / "ml" / "events").read(must_exist=True).deduplicated()
    for seed in a.seeds:
        sp = validation_split(events, seed)
        users, items = sp.user_ids[sp.train_u], sp.item_ids[sp.train_i]
        for l2 in a.l2:
            if not a.no_dense:
                t0 = time.perf_counter()
                m = dense_ease(sp.item_ids, users, items, l2)
                fit_s = time.perf_counter() - t0
                rows.append({"seed": seed, "model": "dense", "neighbours": None, "l2": l2, "fit_s": fit_s, "nnz": m.nnz, **evaluate(m, sp)})
                print(json.dumps(rows[-1]), flush=True)
            for k in a.neighbours:
                t0 = time.perf_counter()
                m = fit_item_item(sp.item_ids, users, items, l2, neighbours=k)
                fit_s = time.perf_counter() - t0
                rows.append({"seed": seed, "model": "sparse", "neighbours": k, "l2": l2, "fit_s": fit_s, "nnz": m.nnz, **evaluate(m, sp)})
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for r in rows:
        summary.setdefault((r["model"], r["neighbours"], r["l2"]), []).append(r["ndcg@10"])
    table = [{"model": k[0], "neighbours": k[1], "l2": k[2], "ndcg@10_mean": float(np.mean(v)), "ndcg@10_std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
              "seeds": len(v)} for k, v in summary.items()]
    best = max((t for t in table if t["model"] == "sparse"), key=lambda t: t["ndcg@10_mean"])
    out = {"protocol": "MovieLens 100K, ratings >= 4, random 80/20 (seed), training 80% split 87.5/12.5 (seed + 1): validation",
           "seeds": a.seeds, "runs": rows, "summary": table, "best_sparse": best}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(best))
    return 0


def _two_stage(src: str, a: argparse.Namespace) -> int:
    import torch

    import pipeline.train
    from features.item_item import DEFAULT_NEIGHBOURS
    from pipeline.protocol_eval import published_protocol

    torch.set_num_threads(1)
    rows = []
    default_l2 = pipeline.train.DEFAULT_L2
    with tempfile.TemporaryDirectory(prefix="parity-ii-two-stage-") as tmp:
        import_movielens(src, Path(tmp) / "ml")
        try:
            for seed in a.seeds:
                for l2 in a.two_stage:
                    pipeline.train.DEFAULT_L2 = l2  # the lambda PipelineConfig.for_profile gives the item-item column
                    t0 = time.perf_counter()
                    res = published_protocol(Path(tmp) / "ml", seed=seed, profile=a.profile, holdout="valid")
                    rows.append({"seed": seed, "l2": l2, "neighbours": DEFAULT_NEIGHBOURS, "profile": a.profile, "s": time.perf_counter() - t0,
                                 **{k: res[k]["ndcg@10"] for k in ("parity_item_item", "parity_two_stage", "parity_two_stage_teacher", "parity_two_tower")}})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            pipeline.train.DEFAULT_L2 = default_l2
    out = {"protocol": "MovieLens 100K published protocol, holdout='valid' (pipeline.protocol_eval), NDCG@10", "runs": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
