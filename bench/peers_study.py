"""Parity beside its peers on MovieLens 100K, both protocols, several seeds (issue 13).

For each seed S: a release trained by `parity train --profile default --seed S` (found under
--releases, else trained here), then in one run
- the time split (`parity eval`): Parity's models (pipeline.evaluate) and the peers
  (pipeline.peers.time_split_peers) on the same held-out users;
- the random 80/20 protocol (`parity eval --protocol`): Parity's models (pipeline.protocol_eval,
  which trains a release on the training 80% with the same profile and seed) and the peers
  (pipeline.peers.protocol_peers) on the split drawn with S.
Every peer's settings are chosen on a validation split of the training part (see
pipeline.peers); the chosen settings are recorded per seed. Writes the JSON (--out) after each
seed, so a stopped run keeps what it measured, and a markdown table of mean, standard deviation
and range over the seeds (--md).

    python -m bench.peers_study --movielens $PARITY_MOVIELENS --seeds 0 1 2 \
        --work /tmp/peers-study --out bench/results/peers.json --md bench/results/peers.md
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench.peers_study")

PARITY_TIME = ("student_int8", "teacher_fp32", "two_tower")  # evaluate_release's two_stage names
PARITY_PROTOCOL = ("parity_two_stage", "parity_two_stage_teacher", "parity_two_tower", "parity_item_item", "mf_als")


def _data_dir(movielens: Path, work: Path) -> Path:
    from features.movielens import import_movielens

    d = work / "data"
    if not (d / "events").is_dir():
        import_movielens(movielens, d)
    return d


def _release(data: Path, releases: Path, seed: int, profile: str) -> Path:
    """A valid release of this profile and seed trained on MovieLens under `releases`, else a new one."""
    from export.release import scan_releases

    if releases.is_dir():
        for r in scan_releases(releases).valid:
            s = r.summary()
            if s.seed == seed and s.profile == profile and s.dataset_kind == "movielens":
                log.info("seed %s: release %s", seed, r.path)
                return r.path
    from pipeline.train import train_release

    log.info("seed %s: training a %s release", seed, profile)
    return train_release(data, releases, profile=profile, seed=seed).path


def run_seed(data: Path, release: Path, seed: int, parity_protocol: bool) -> dict:
    from export.release import load_release
    from pipeline.evaluate import evaluate_release
    from pipeline.peers import protocol_peers, time_split_peers

    out: dict = {"seed": seed, "release": load_release(release).release_id}
    t = time.perf_counter()
    ev = evaluate_release(release, data)
    tp = time_split_peers(release, data)
    out["time_split"] = {"users": ev.users, "parity": {k: ev.two_stage[k] for k in PARITY_TIME}, "peers": tp["peers"],
                         "peers_seconds": tp["seconds"]}
    log.info("seed %s: time split done (%.0f s)", seed, time.perf_counter() - t)
    t = time.perf_counter()
    pp = protocol_peers(data, seed=seed)
    out["protocol"] = {"users": pp["users"], "peers": pp["peers"], "peers_seconds": pp["seconds"], "parity": {}}
    if parity_protocol:
        from pipeline.protocol_eval import published_protocol

        pub = published_protocol(data, release)
        out["protocol"]["parity"] = {k: pub[k] for k in PARITY_PROTOCOL if k in pub}
        if pub["popularity"]["ndcg@10"] != pp["peers"]["popularity"]["ndcg@10"]:
            raise RuntimeError(f"seed {seed}: the peers' popularity differs from the protocol's own")
    log.info("seed %s: random 80/20 done (%.0f s)", seed, time.perf_counter() - t)
    return out


def _rows(runs: list[dict], part: str) -> dict[str, list[tuple[int, float, float]]]:
    rows: dict[str, list[tuple[int, float, float]]] = {}
    for r in runs:
        for side, prefix in (("parity", "Parity "), ("peers", "")):
            for name, v in r[part][side].items():
                rows.setdefault(prefix + name.removeprefix("parity_"), []).append((r["seed"], v["ndcg@10"], v["recall@10"]))
    return rows


def markdown(runs: list[dict]) -> str:
    """Mean, standard deviation (ddof=1) and range over seeds per model, per protocol, best first."""
    seeds = [r["seed"] for r in runs]
    lines = [f"Peers beside Parity on MovieLens 100K, seeds {seeds} (bench/peers_study.py; settings chosen on validation).",
             "Parity two_stage / student_int8: retrieve, rank with the int8 student; Parity mf_als: models/mf.py's ALS baseline.", ""]
    for part, title in (("time_split", "time split (`parity eval`, per-user cut, held-out users)"),
                        ("protocol", "random 80/20 of ratings >= 4 (`parity eval --protocol`, full ranking)")):
        lines += [f"### {title}", "", "| model | NDCG@10 mean | sd | min-max | recall@10 mean | seeds |", "|---|---|---|---|---|---|"]
        rows = _rows(runs, part)
        for name, v in sorted(rows.items(), key=lambda kv: -np.mean([x[1] for x in kv[1]])):
            nd = np.array([x[1] for x in v])
            rc = np.array([x[2] for x in v])
            sd = f"{nd.std(ddof=1):.4f}" if len(nd) > 1 else "-"
            lines.append(f"| {name} | {nd.mean():.4f} | {sd} | {nd.min():.4f}-{nd.max():.4f} | {rc.mean():.4f} | {len(nd)} |")
        lines += ["", "Chosen settings per seed:", ""]
        for r in runs:
            for name, v in r[part]["peers"].items():
                if v.get("settings") and name != "popularity":
                    lines.append(f"- seed {r['seed']} {name}: " + ", ".join(f"{k}={x}" for k, x in v["settings"].items()))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--movielens", type=Path, help="the ml-100k folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", type=Path, help="folder for the imported data dir and releases")
    p.add_argument("--releases", type=Path, default=None, help="where to look for trained releases (default WORK/releases)")
    p.add_argument("--profile", default="default")
    p.add_argument("--no-parity-protocol", action="store_true", help="skip Parity's own random 80/20 run (it trains a second release per seed)")
    p.add_argument("--out", type=Path, default=Path("bench/results/peers.json"))
    p.add_argument("--md", type=Path, default=Path("bench/results/peers.md"))
    p.add_argument("--combine", type=Path, nargs="+", default=None,
                   help="no run: merge the runs of these JSON files (seeds run by separate processes) into --out and --md")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.combine:
        files = [json.loads(f.read_text()) for f in a.combine]
        runs = sorted((r for f in files for r in f["runs"]), key=lambda r: r["seed"])
        if len({r["seed"] for r in runs}) != len(runs) or len({f["profile"] for f in files}) != 1:
            raise SystemExit("--combine: a seed appears twice, or the files differ in profile")
        a.out.write_text(json.dumps({"profile": files[0]["profile"], "runs": runs}, indent=1, sort_keys=True))
        a.md.write_text(markdown(runs))
        print(markdown(runs))
        return 0
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    if a.movielens is None or a.work is None:
        p.error("--movielens and --work are needed for a run")
    data = _data_dir(a.movielens, a.work)
    releases = a.releases or a.work / "releases"
    runs = []
    for seed in a.seeds:
        runs.append(run_seed(data, _release(data, releases, seed, a.profile), seed, not a.no_parity_protocol))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"profile": a.profile, "runs": runs}, indent=1, sort_keys=True))
        a.md.write_text(markdown(runs))
    print(markdown(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
