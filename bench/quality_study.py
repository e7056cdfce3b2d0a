"""Recommendation quality against popularity and the published peers, over seeds (issue 13).

Each case trains a release with the product's own code (pipeline.train.train_release: the
candidate union, quotas chosen on validation, rankers trained on the union lists) and
measures NDCG@10 on its held-out slice with `parity eval`'s code (pipeline.evaluate) and, for
MovieLens, under the published random 80/20 protocol (pipeline.protocol_eval). Nothing here
is tuned: every setting is the release's own, chosen on its validation split.

    python -m bench.quality_study --movielens DIR --sim-root DIR [--seeds 0,1,2] [--sim-seeds 0,1,2,3,4]
        [--drift DIR] [--protocol] [--profile default] [--sim-profile small] [--out bench/results/quality.json]

Data dirs: `parity data import-movielens $PARITY_MOVIELENS --out DIR`; simulator data at demo
size, one dir per data seed under --sim-root named sim<seed> (`parity data simulate --out
ROOT/sim<s> --users 2000 --items 500 --days 14 --seed s`); the drift log `--days 6 --seed 0`.
Writes JSON with every run and a mean / min / max per case. Minutes per run: run it niced.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _ndcg(two_stage: dict) -> dict:
    out = {k: round(v["ndcg@10"], 4) for k, v in two_stage.items()}
    out["int8_vs_popularity"] = round(two_stage["student_int8"]["ndcg@10"] / two_stage["popularity"]["ndcg@10"], 3)
    out["int8_vs_teacher"] = round(two_stage["student_int8"]["ndcg@10"] / two_stage["teacher_fp32"]["ndcg@10"], 4)
    return out


def time_split(data_dir: Path, seed: int, profile: str) -> dict:
    from pipeline.evaluate import evaluate_release
    from pipeline.train import train_release

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        rel = train_release(data_dir, tmp, profile=profile, seed=seed)
        res = evaluate_release(rel.path, data_dir)
        out = _ndcg(res.two_stage)
        valid = _ndcg(evaluate_release(rel.path, data_dir, part="valid").two_stage)  # the slice the release chose its settings on
        out["valid"] = {k: valid[k] for k in ("student_int8", "two_tower", "popularity", "int8_vs_popularity")}
        if "ranker_refit" in rel.manifest["metrics"]:  # the rankers were refitted on the validation lists too: in-sample there
            out["valid"]["in_sample"] = True
        for key in ("trend_choice", "ranker_refit"):  # what the release chose on its validation lists
            if key in rel.manifest["metrics"]:
                out[key] = rel.manifest["metrics"][key]
        out["quotas"] = dict(rel.meta.candidates)
        out["quota_study"] = rel.meta.raw["retrieval"].get("candidate_quotas_valid")
    out["seconds"] = round(time.perf_counter() - t, 1)
    return out


def protocol(data_dir: Path, seed: int, profile: str) -> dict:
    from pipeline.protocol_eval import published_protocol

    t = time.perf_counter()
    res = published_protocol(data_dir, seed=seed, profile=profile)
    out = {k: round(v["ndcg@10"], 4) for k, v in res.items()}
    out["seconds"] = round(time.perf_counter() - t, 1)
    return out


def spread(runs: list[dict], keys: tuple[str, ...]) -> dict:
    out = {}
    for k in keys:
        v = np.asarray([r[k] for r in runs if k in r], dtype=np.float64)
        if len(v):
            out[k] = {"mean": round(float(v.mean()), 4), "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--movielens", type=Path)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--protocol", action="store_true", help="also the published random 80/20 protocol per seed")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--sim-root", type=Path)
    ap.add_argument("--sim-seeds", default="0,1,2,3,4")
    ap.add_argument("--sim-profile", default="small")
    ap.add_argument("--drift", type=Path, help="the 6-day drift log's data dir")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    report: dict = {"profile": args.profile, "sim_profile": args.sim_profile}
    keys = ("student_int8", "teacher_fp32", "two_tower", "popularity", "int8_vs_popularity", "int8_vs_teacher")
    if args.movielens:
        seeds = [int(s) for s in args.seeds.split(",")]
        runs = {s: time_split(args.movielens, s, args.profile) for s in seeds}
        report["movielens_time_split"] = {"runs": runs, "spread": spread(list(runs.values()), keys)}
        if args.protocol:
            pr = {s: protocol(args.movielens, s, args.profile) for s in seeds}
            report["movielens_protocol"] = {"runs": pr, "spread": spread(list(pr.values()), tuple(next(iter(pr.values())).keys()))}
    if args.sim_root:
        runs = {s: time_split(args.sim_root / f"sim{s}", 0, args.sim_profile) for s in (int(x) for x in args.sim_seeds.split(","))}
        report["simulator"] = {"runs": runs, "spread": spread(list(runs.values()), keys)}
    if args.drift:
        report["drift"] = time_split(args.drift, 0, args.sim_profile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, sort_keys=True))
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
