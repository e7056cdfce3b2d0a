"""Drift study: does `monitor.drift` find the simulator's planted topic-trend shift, and how
often does it alarm on traffic without one? Shared by the threshold calibration
(bench/drift_calibrate.py, seeds used for nothing else) and the held-out report (this module's
`main`, seeds 0-2 and MovieLens).

Per simulator seed (`make_world`):
1. Two worlds from one seed: the simulator with its shift (`n_drift_topics` topics boosted over
   the last `drift_days` days) and without (n_drift_topics=0): same population, only the events
   differ.
2. A tiny release trained on the shifted world's events before the shift starts. Its reference
   is what `parity train` records now: the server's candidate rows (candidate_union, 8 drawn
   uniformly per request) of requests in its validation slice, scored by its int8 student.
3. "Served" rows built exactly that way (export.reference.served_rows, the same function) for
   each session start from `pre_hours` before the shift to the end, in both worlds, written in
   the served log's format and read back.
4. Ground truth per column: planted, `user_activity.topic_affinity[t]` of each drifting topic t
   (the simulator's mechanism: a topic's share of the user's plays), however small its effect;
   or the shift period's rows of the shifted world differ from the unshifted world's (same
   hours) by PSI >= 0.2 or JS >= 0.1.

Per reference option (`release`: the release's reference; `served:R`: a rolling reference, the
served log's rows of the R hours before each window) and window length W, `window_stats`
computes every column's PSI, JS, BH-adjusted p-value and missing-rate verdict once per window;
`evaluate` then applies any thresholds to them:
- false alarms: non-overlapping W-hour windows over the shift period of the world without the
  shift; rate = alerts / (columns x windows);
- detection: a W-hour window slid hour by hour over the shifted world; per shifted column the
  first alert after the shift starts (delay in hours and in requests logged since).

MovieLens (`movielens_world`): no planted shift. A release is trained on all but the last
`weeks` weeks; requests are the (user, hour) of ratings in those weeks; every alert is a false
alarm against "nothing was planted" (the natural-drift baseline: tastes and the catalogue do move).

`python -m bench.drift_study [--seeds 0 1 2] [--out bench/results/drift.json]` reads the chosen
thresholds from bench/results/drift_calibration.json; bench/drift_report.py renders the JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from export.reference import column_references, histogram_reference, release_reference, served_rows
from monitor.drift import PREDICTION, DriftThresholds, drift_report
from monitor.served_log import COLUMNS_KEY, RELEASE_KEY, ServedRecord, read_served_log, records_to_table

__all__ = ["StudyConfig", "World", "make_world", "movielens_world", "window_stats", "evaluate", "main"]

MS_H = 3_600_000
MS_DAY = 24 * MS_H


@dataclass(frozen=True)
class StudyConfig:
    users: int = 2000
    items: int = 300
    days: int = 14  # the simulator's default: 7-day counts are warmed up well before the shift
    drift_days: int = 3
    n_drift_topics: int = 3
    drift_boost: float = 5.0
    per_request: int = 8  # sampled candidates logged per request (the server's default)
    max_requests_per_hour: int = 80
    pre_hours: int = 48  # served rows before the shift (rolling references look back into them)
    truth_psi: float = 0.2
    truth_js: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Rows:
    ts: np.ndarray  # per row (the request's time)
    X: np.ndarray
    p: np.ndarray

    def window(self, since: int, until: int) -> tuple[np.ndarray, np.ndarray]:
        m = (self.ts >= since) & (self.ts < until)
        return self.X[m], self.p[m]


@dataclass
class World:
    name: str
    columns: tuple[str, ...]
    reference: dict  # the release's, samples attached
    rows: dict[str, Rows]  # "shifted" / "stable" (MovieLens: "stable" only)
    start: int  # shift start (MovieLens: the first served hour)
    end: int
    truth: dict[str, dict]
    meta: dict


def _truncate(src: Path, dst: Path, before_ts: int) -> Path:
    """A copy of a data dir holding only the event-day partitions before `before_ts` (a midnight)."""
    from features.events import MS_PER_DAY

    shutil.copytree(src, dst)
    for part in (dst / "events").glob("day=*"):
        day = np.datetime64(part.name.split("=", 1)[1], "ms").astype(np.int64)
        if day + MS_PER_DAY > before_ts:
            shutil.rmtree(part)
    return dst


def _requests(events, since: int, until: int, cap_per_hour: int, rng: np.random.Generator, sessions: bool) -> tuple[np.ndarray, np.ndarray]:
    """(user, ts) of requests in [since, until): each session's first event (MovieLens, without
    sessions: a user's first rating of each hour), at most `cap_per_hour` per hour and one per
    user per hour (served_rows wants unique users per batch, and a batch is an hour)."""
    m = (events.ts >= since) & (events.ts < until)
    key = events.session_id[m] if sessions else (events.user_id[m].astype(np.int64) << 32) | (events.ts[m] // MS_H)
    ts, uid = events.ts[m], events.user_id[m]
    order = np.lexsort((ts, key))
    key, ts, uid = key[order], ts[order], uid[order]
    first = np.r_[True, key[1:] != key[:-1]]
    ts, uid = ts[first], uid[first]
    users, times = [], []
    for h in np.unique(ts // MS_H).tolist():
        sel = np.flatnonzero((ts // MS_H) == h)
        _, keep = np.unique(uid[sel], return_index=True)
        sel = sel[np.sort(keep)]
        if len(sel) > cap_per_hour:
            sel = np.sort(rng.choice(sel, cap_per_hour, replace=False))
        users.append(uid[sel])
        times.append(ts[sel])
    return (np.concatenate(users), np.concatenate(times)) if users else (np.zeros(0, np.int64), np.zeros(0, np.int64))


def _served(release, data_dir: Path, since: int, until: int, cfg: StudyConfig, seed: int, log_root: Path) -> tuple[tuple[str, ...], Rows, int]:
    """Rows logged for requests in [since, until) of a data dir, through the served log's format."""
    from export.runtime import ReleaseRuntime
    from features.catalog import ItemCatalog
    from features.datasets import load_info, read_items
    from features.eventlog import EventLog
    from features.pit import PitJoiner
    from features.repo import feature_sets
    from export.candidates import NewItems

    info = load_info(data_dir)
    rt = ReleaseRuntime.load(release, rankers=("student_int8",))
    sets = {fs.name: fs for fs in feature_sets(info.kind, info.n_topics)}
    used = [sets[n] for n in rt.inputs.sets]
    events = EventLog(Path(data_dir) / "events").read(must_exist=True).deduplicated()
    items = ItemCatalog.from_table(read_items(data_dir))
    joiner = PitJoiner(used, events)
    new = NewItems.of(rt, items)
    rng = np.random.default_rng(seed)
    users, times = _requests(events, since, until, cfg.max_requests_per_hour, rng, sessions=info.kind != "movielens")
    columns = tuple(rt.inputs.columns)
    records: list[ServedRecord] = []
    hours = times // MS_H
    for h in np.unique(hours).tolist():
        sel = hours == h
        r = served_rows(rt, joiner, used, sets[rt.inputs.user_set], events, info.kind, items, users[sel], times[sel],
                        per_request=cfg.per_request, new=new, seed=seed * 100_003 + h)
        for q, (u, t) in enumerate(zip(r["users"].tolist(), r["ts"].tolist())):
            pk = r["request"] == q
            n = int(pk.sum())
            records.append(ServedRecord(
                request_id=f"{seed}-{u}-{t}", ts_ms=int(t), user_id=int(u), release_id=release.release_id, arm="primary",
                method="Recommend", status="ok", degraded_reason=None, latency_ms=0.0, n_candidates=int(r["n_candidates"][q]),
                item_ids=np.arange(n, dtype=np.int64), positions=np.full(n, -1, np.int32), scores=r["scores"][pk],
                sources=["ann"] * n, sampled=np.ones(n, bool), features=r["X"][pk], columns=columns))
    records.sort(key=lambda x: x.ts_ms)
    # the served log's format (the server's layout: dt=DAY/<release>/part-*.parquet), read back
    d = log_root / f"dt={np.datetime64(records[0].ts_ms, 'ms').astype('datetime64[D]')}" / release.release_id
    d.mkdir(parents=True, exist_ok=True)
    table = records_to_table(records).replace_schema_metadata(
        {COLUMNS_KEY: json.dumps(list(columns)).encode(), RELEASE_KEY: release.release_id.encode()})
    pq.write_table(table, d / f"part-{records[0].ts_ms}-0-0.parquet")
    (batch,) = read_served_log(log_root)
    t = batch.table
    mask = t.column("sampled").to_numpy(zero_copy_only=False)
    rows = Rows(t.column("ts_ms").to_numpy()[mask], batch.feature_matrix(mask),
                np.asarray(t.column("score").to_numpy(zero_copy_only=False), np.float32)[mask])
    return batch.columns, rows, len(records)


def _truth(columns, shifted: np.ndarray, stable: np.ndarray, p_sh: np.ndarray, p_st: np.ndarray, cfg: StudyConfig) -> dict[str, dict]:
    """Per column: the shifted world's rows against the unshifted world's, same hours (same seed)."""
    ref = {"features": column_references(stable, columns), "prediction": histogram_reference(p_st, bins=20)}
    rep = drift_report(ref, columns, shifted, p_sh, DriftThresholds(min_rows=1))
    out = {}
    for f in (*rep.features, rep.prediction):
        psi, js = f.psi or 0.0, f.js or 0.0
        miss = (f.missing_rate or 0.0) - f.reference_missing_rate
        out[f.name] = {"psi": psi, "js": js, "missing_rise": miss,
                       "shifted": bool(psi >= cfg.truth_psi or js >= cfg.truth_js or abs(miss) > DriftThresholds().missing_rise)}
    return out


def make_world(seed: int, work: Path, cfg: StudyConfig | None = None) -> World:
    cfg = cfg or StudyConfig()
    from features.datasets import load_info
    from features.simulator import simulate
    from pipeline.train import train_release

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    dirs = {}
    for name, nd in (("shifted", cfg.n_drift_topics), ("stable", 0)):
        dirs[name] = work / f"data_{name}"
        if not dirs[name].exists():
            simulate(dirs[name], users=cfg.users, items=cfg.items, days=cfg.days, seed=seed,
                     drift_days=cfg.drift_days, n_drift_topics=nd, drift_boost=cfg.drift_boost)
    info = load_info(dirs["shifted"])
    shift_ts, end_ts = int(info.params["drift_start_ts"]), int(info.end_ts)
    shutil.rmtree(work / "data_train", ignore_errors=True)
    shutil.rmtree(work / "releases", ignore_errors=True)
    release = train_release(_truncate(dirs["shifted"], work / "data_train", shift_ts), work / "releases", profile="tiny", seed=0)
    t_train = time.perf_counter()
    rows, columns, n_req = {}, None, {}
    for name, d in dirs.items():
        shutil.rmtree(work / f"served_{name}", ignore_errors=True)
        columns, rows[name], n_req[name] = _served(release, d, shift_ts - cfg.pre_hours * MS_H, end_ts, cfg, seed, work / f"served_{name}")
    Xs, ps = rows["shifted"].window(shift_ts, end_ts)
    Xn, pn = rows["stable"].window(shift_ts, end_ts)
    truth = _truth(columns, Xs, Xn, ps, pn, cfg)
    for t in info.params["drift_topics"]:  # the planted mechanism is shifted by construction, however small its effect
        c = f"user_activity.topic_affinity[{t}]"
        if c in truth:
            truth[c]["shifted"] = truth[c]["planted"] = True
    meta = {"seed": seed, "release_id": release.release_id, "reference_population": release.manifest["reference"].get("population"),
            "drift_topics": info.params["drift_topics"], "requests": n_req,
            "rows": {k: len(v.ts) for k, v in rows.items()},
            "requests_per_hour": n_req["shifted"] / ((end_ts - shift_ts) / MS_H + cfg.pre_hours),
            "seconds": {"train": round(t_train - t0, 1), "total": round(time.perf_counter() - t0, 1)}}
    return World(f"sim{seed}", columns, release_reference(release), rows, shift_ts, end_ts, truth, meta)


def cached_world(make, cache: Path) -> World:
    """A world from its pickle under `cache` when there (a rerun reuses it), else made and kept."""
    import pickle

    if cache.exists():
        return pickle.loads(cache.read_bytes())
    w = make()
    cache.write_bytes(pickle.dumps(w))
    return w


def movielens_world(raw_dir: Path, work: Path, weeks: int = 4, cfg: StudyConfig | None = None) -> World:
    """MovieLens 100K: a release trained before its last `weeks` weeks, served rows over them."""
    cfg = cfg or StudyConfig()
    from features.datasets import load_info
    from features.movielens import import_movielens
    from pipeline.train import train_release

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.exists():
        import_movielens(raw_dir, data)
    info = load_info(data)
    end_ts = int(info.end_ts)
    cut = (end_ts // MS_DAY - 7 * weeks) * MS_DAY
    shutil.rmtree(work / "data_train", ignore_errors=True)
    shutil.rmtree(work / "releases", ignore_errors=True)
    release = train_release(_truncate(data, work / "data_train", cut), work / "releases", profile="tiny", seed=0)
    t_train = time.perf_counter()
    shutil.rmtree(work / "served", ignore_errors=True)
    columns, rows, n_req = _served(release, data, cut, end_ts, cfg, 0, work / "served")
    truth = {n: {"psi": 0.0, "js": 0.0, "missing_rise": 0.0, "shifted": False} for n in (*columns, PREDICTION)}
    meta = {"release_id": release.release_id, "reference_population": release.manifest["reference"].get("population"),
            "cut_ms": cut, "weeks": weeks, "requests": {"stable": n_req}, "rows": {"stable": len(rows.ts)},
            "requests_per_hour": n_req / ((end_ts - cut) / MS_H),
            "seconds": {"train": round(t_train - t0, 1), "total": round(time.perf_counter() - t0, 1)}}
    return World("movielens", columns, release_reference(release), {"stable": rows}, cut, end_ts, truth, meta)


# ---------------------------------------------------------------------------------------------
# Statistics once per window, thresholds applied after.

def _rolling_ref(rows: Rows, columns, since: int, hours: int, sample: int = 2000) -> dict | None:
    X, p = rows.window(since - hours * MS_H, since)
    if len(X) < 100:
        return None
    return {"features": column_references(X, columns, sample=sample), "prediction": histogram_reference(p, bins=20, sample=sample)}


def window_stats(world: World, option: str, W: int, which: str, ends: list[int]) -> dict:
    """Per window ending at each of `ends` (ms), over `which` world's rows: arrays (windows,
    names) of PSI, JS, BH-adjusted p, present rows, and the missing-rate verdict (default rule)."""
    rows = world.rows[which]
    names = (*world.columns, PREDICTION)
    shape = (len(ends), len(names))
    psi, js, padj, present = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape, np.int64)
    miss = np.zeros(shape, bool)
    reqs = np.zeros(len(ends), np.int64)
    th = DriftThresholds(min_rows=1)
    for i, end in enumerate(ends):
        since = end - W * MS_H
        ref = world.reference if option == "release" else _rolling_ref(rows, world.columns, since, int(option.split(":", 1)[1].rstrip("h")))
        X, p = rows.window(since, end)
        if ref is None or len(X) == 0:
            continue
        rep = drift_report(ref, world.columns, X, p, th)
        for j, f in enumerate((*rep.features, rep.prediction)):
            if f is None:
                continue
            psi[i, j] = np.nan if f.psi is None else f.psi
            js[i, j] = np.nan if f.js is None else f.js
            padj[i, j] = np.nan if f.p_adjusted is None else f.p_adjusted
            present[i, j] = f.present
            miss[i, j] = "missing" in f.reasons
    return {"names": names, "ends": np.asarray(ends, np.int64), "psi": psi, "js": js, "p": padj, "present": present, "missing": miss}


def alarms(st: dict, th: DriftThresholds, rule: str = "or") -> np.ndarray:
    """(windows, names) bool: what `monitor.drift` decides with these thresholds (rule "or":
    PSI or JS over its threshold; "psi"/"js": that one alone; "and": both)."""
    with np.errstate(invalid="ignore"):
        sig = (st["p"] < th.alpha) & (st["present"] >= th.min_rows)
        big_psi, big_js = st["psi"] >= th.psi, st["js"] >= th.js
    eff = {"or": big_psi | big_js, "psi": big_psi, "js": big_js, "and": big_psi & big_js}[rule]
    return (sig & eff) | (st["missing"] & (st["present"] >= th.min_rows))


def windows_for(world: World, W: int, step_h: int = 1) -> dict[str, list[int]]:
    """Window ends: non-overlapping over the shift period (false alarms), sliding by `step_h`
    hours (detection; the study slides hourly)."""
    fa = list(range(world.start + W * MS_H, world.end + 1, W * MS_H))
    slide = list(range(world.start + step_h * MS_H, world.end + 1, step_h * MS_H))
    return {"fa": fa, "slide": slide}


def world_stats(world: World, option: str, W: int, step_h: int = 1) -> dict:
    e = windows_for(world, W, step_h)
    out = {"fa": window_stats(world, option, W, "stable", e["fa"])}
    if "shifted" in world.rows:
        out["slide"] = window_stats(world, option, W, "shifted", e["slide"])
    return out


def evaluate(world: World, stats: dict, th: DriftThresholds, rule: str = "or") -> dict:
    names = stats["fa"]["names"]
    fa = alarms(stats["fa"], th, rule)
    by_col = {n: int(c) for n, c in zip(names, fa.sum(axis=0)) if c}
    out = {"false_alarms": {"alerts": int(fa.sum()), "windows": int(fa.shape[0]), "columns": len(names),
                            "rate": float(fa.mean()) if fa.size else None, "by_column": by_col}}
    if "slide" in stats:
        sl = alarms(stats["slide"], th, rule)
        ends = stats["slide"]["ends"]
        shifted_ts = world.rows["shifted"].ts
        req_ts = np.unique(shifted_ts)
        shifted = [n for n in names if world.truth[n]["shifted"]]
        delays, stable_alerted = {}, []
        for j, n in enumerate(names):
            hit = np.flatnonzero(sl[:, j])
            if n in shifted:
                delays[n] = None if not len(hit) else {
                    "hours": float((ends[hit[0]] - world.start) / MS_H),
                    "requests": int(((req_ts >= world.start) & (req_ts < ends[hit[0]])).sum())}
            elif len(hit):
                stable_alerted.append(n)
        out.update(detected=sorted(n for n in shifted if delays[n] is not None), missed=sorted(n for n in shifted if delays[n] is None),
                   delays=delays, alerted_stable_columns_in_shifted_world=sorted(stable_alerted))
    return out


def summarize(per_world: list[dict]) -> dict:
    alerts = sum(r["false_alarms"]["alerts"] for r in per_world)
    cells = sum(r["false_alarms"]["windows"] * r["false_alarms"]["columns"] for r in per_world)
    out = {"false_alarm_rate": alerts / cells if cells else None, "false_alarms": alerts, "feature_windows": cells}
    sh = [r for r in per_world if "delays" in r]
    if sh:
        hours = [d["hours"] for r in sh for d in r["delays"].values() if d is not None]
        reqs = [d["requests"] for r in sh for d in r["delays"].values() if d is not None]
        out.update(shifted_detected=sum(len(r["detected"]) for r in sh), shifted_total=sum(len(r["delays"]) for r in sh),
                   seeds_detected=sum(bool(r["detected"]) for r in sh), seeds=len(sh),
                   stable_alerted_in_shifted_world=sum(len(r["alerted_stable_columns_in_shifted_world"]) for r in sh),
                   delay_hours_median=float(np.median(hours)) if hours else None, delay_hours_max=float(np.max(hours)) if hours else None,
                   delay_requests_median=float(np.median(reqs)) if reqs else None)
    return out


# ---------------------------------------------------------------------------------------------

def load_choice(path: Path) -> tuple[DriftThresholds, str, int, str]:
    """(thresholds, rule, window hours, reference option) chosen by bench/drift_calibrate.py."""
    c = json.loads(Path(path).read_text())["chosen"]
    return DriftThresholds(**c["thresholds"]), c["rule"], int(c["window_h"]), c["reference"]


def calibration_summary(path: Path) -> dict:
    """The calibration's choice and evidence, carried in drift.json (the report renders both)."""
    cal = json.loads(Path(path).read_text())
    return {k: cal[k] for k in ("seeds", "points", "feasible", "max_false_alarm_rate", "chosen", "best_per_option", "previous_defaults")}


def main(argv: list[str] | None = None) -> int:
    import os
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--users", type=int, default=StudyConfig.users)
    ap.add_argument("--calibration", default="bench/results/drift_calibration.json")
    ap.add_argument("--movielens", default=os.environ.get("PARITY_MOVIELENS"), help="raw MovieLens 100K folder (default $PARITY_MOVIELENS)")
    ap.add_argument("--weeks", type=int, default=4)
    ap.add_argument("--out", default="bench/results/drift.json")
    ap.add_argument("--work", default=None, help="keep the worlds, releases and served logs here (default: a temporary folder)")
    a = ap.parse_args(argv)
    cfg = StudyConfig(users=a.users)
    th, rule, W, option = load_choice(Path(a.calibration))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        res = {"config": cfg.to_dict(), "chosen": {"thresholds": th.to_dict(), "rule": rule, "window_h": W, "reference": option},
               "seeds": [], "calibration": calibration_summary(Path(a.calibration))}
        compare = sorted({option, "release"})
        per_opt: dict[str, list[dict]] = {o: [] for o in compare}
        for s in a.seeds:
            w = cached_world(lambda: make_world(s, work / f"seed{s}", cfg), work / f"seed{s}" / "world.pkl")
            seed_out = {**w.meta, "shifted_columns": sorted(n for n, t in w.truth.items() if t["shifted"]),
                        "truth": {n: t for n, t in w.truth.items() if t["shifted"] or n.startswith("user_activity.topic_affinity")}}
            for o in compare:
                r = evaluate(w, world_stats(w, o, W), th, rule)
                per_opt[o].append(r)
                seed_out[o] = r
            res["seeds"].append(seed_out)
        res["summary"] = {o: summarize(v) for o, v in per_opt.items()}
        if a.movielens:
            ml = cached_world(lambda: movielens_world(Path(a.movielens), work / "movielens", a.weeks, cfg), work / "movielens" / "world.pkl")
            res["movielens"] = {**ml.meta}
            for o in compare:
                for Wm in sorted({W, 24, 168}):
                    r = evaluate(ml, world_stats(ml, o, Wm), th, rule)
                    res["movielens"][f"{o}/{Wm}h"] = r
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(json.dumps(res["summary"], sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
