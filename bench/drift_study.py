"""Drift study: does `monitor.drift` find the simulator's planted topic-trend shift, stay quiet on
the columns it did not move, and how often does it alarm on traffic without a shift?

Per seed:
1. Two worlds from one seed: the simulator with its shift (`n_drift_topics` topics boosted over
   the last `drift_days` days) and without (n_drift_topics=0). Topics, items, users and their
   tastes are drawn before the shifted topics are, so both worlds hold the same population;
   only the events differ (the shift, and the draws after it).
2. A tiny release trained on the shifted world's events before the shift starts.
3. "Served" rows built the way the server logs them, through the batch path that is proven
   equal to serving (parity): each session start is a request at its time; its candidate list
   is the release's retrieval (export.device.lists.release_lists, the ANN stage eval and the
   device use); `per_request` candidates drawn uniformly from it are the `sampled` rows, with
   the ranker inputs `teacher_matrix` computes (what `parity eval` ranks) and the int8
   student's score. They go through the served log's own format (records_to_table, Parquet
   with the column metadata) and are read back with read_served_log.
4. Ground truth, per column: in the shift period, the shifted world's rows against the
   unshifted world's (same seed, same hours): "shifted" when PSI >= 0.2 or JS >= 0.1 between
   them (the detector's own effect-size thresholds).
5. Drift against two references:
   - `release`: the reference the release carries (built at training time over its training
     rows: for the simulator, the impressions, not retrieval candidates);
   - `serving`: the same histograms built over the sampled candidate rows of the last
     `ref_hours` hours before the shift (the population the served log samples).
   In the shifted world, a sliding window of each of `windows_h` hours advanced hour by hour: for each
   column the first alert after the shift starts (detection delay in hours and in logged
   requests). In the unshifted world, non-overlapping windows over the shift period: the
   false-alarm rate = alerts / (columns x windows).

`python -m bench.drift_study [--seeds 0 1 2] [--out bench/results/drift.json]`; the report
(bench/drift_report.py) renders the JSON as a section of bench/RESULTS.md. A small version
runs in tests/monitor/test_drift_study.py.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from export.reference import column_references, histogram_reference
from monitor.drift import PREDICTION, DriftThresholds, drift_report
from monitor.served_log import (
    COLUMNS_KEY,
    RELEASE_KEY,
    ServedRecord,
    read_served_log,
    records_to_table,
)

__all__ = ["StudyConfig", "main", "run_seed", "run_study"]

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
    candidates: int = 100  # retrieval list length per request
    per_request: int = 4  # sampled candidates logged per request
    max_requests_per_hour: int = 80
    windows_h: tuple[int, ...] = (6, 24)  # sliding-window lengths studied (24 h spans a whole day's cycle)
    ref_hours: int = 24  # the serving reference: sampled rows of the last day before the shift
    truth_psi: float = 0.2
    truth_js: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


def _truncate(src: Path, dst: Path, before_ts: int) -> Path:
    """A copy of a data dir holding only the event-day partitions before `before_ts` (a midnight)."""
    from features.events import MS_PER_DAY

    shutil.copytree(src, dst)
    for part in (dst / "events").glob("day=*"):
        day = np.datetime64(part.name.split("=", 1)[1], "ms").astype(np.int64)
        if day + MS_PER_DAY > before_ts:
            shutil.rmtree(part)
    return dst


def _requests(events, since: int, until: int, cap_per_hour: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(user, ts) of session starts in [since, until): each session's first event is a request.
    At most `cap_per_hour` per hour, and one per user per hour (release_lists wants unique users
    per batch, and a batch is an hour)."""
    m = (events.ts >= since) & (events.ts < until)
    sid, ts, uid = events.session_id[m], events.ts[m], events.user_id[m]
    order = np.lexsort((ts, sid))
    sid, ts, uid = sid[order], ts[order], uid[order]
    first = np.r_[True, sid[1:] != sid[:-1]]
    ts, uid = ts[first], uid[first]
    users, times = [], []
    for h in range(since // MS_H, -(-until // MS_H)):
        sel = np.flatnonzero((ts // MS_H) == h)
        _, keep = np.unique(uid[sel], return_index=True)
        sel = sel[np.sort(keep)]
        if len(sel) > cap_per_hour:
            sel = np.sort(rng.choice(sel, cap_per_hour, replace=False))
        users.append(uid[sel])
        times.append(ts[sel])
    return np.concatenate(users), np.concatenate(times)


def _served_rows(release, data_dir: Path, since: int, until: int, cfg: StudyConfig, seed: int) -> list[ServedRecord]:
    """Requests in [since, until) of a world, logged as the server logs its sampled candidates."""
    from export.device.lists import ReleaseLists, release_lists, teacher_matrix
    from export.runtime import ReleaseRuntime
    from features.catalog import ItemCatalog
    from features.datasets import load_info, read_items
    from features.eventlog import EventLog
    from features.pit import PitJoiner
    from features.repo import feature_sets

    info = load_info(data_dir)
    rt = ReleaseRuntime.load(release, rankers=("student_int8",))
    sets = {fs.name: fs for fs in feature_sets(info.kind, info.n_topics)}
    used = [sets[n] for n in rt.inputs.sets]
    events = EventLog(Path(data_dir) / "events").read(must_exist=True).deduplicated()
    items = ItemCatalog.from_table(read_items(data_dir))
    joiner = PitJoiner(used, events)
    rng = np.random.default_rng(seed)
    users, times = _requests(events, since, until, cfg.max_requests_per_hour, rng)
    columns = tuple(rt.inputs.columns)
    records: list[ServedRecord] = []
    for h in np.unique(times // MS_H).tolist():
        sel = (times // MS_H) == h
        lists = release_lists(rt, joiner, sets[rt.inputs.user_set], events, info.kind, items, users[sel], times[sel], k=cfg.candidates)
        picks = []
        for ids in lists.ids:
            ids = ids[ids >= 0]
            picks.append(np.sort(rng.choice(ids, min(cfg.per_request, len(ids)), replace=False)) if len(ids) else ids)
        if rt.inputs.uses_retrieval:  # list-relative columns need the whole list: compute it, keep the picks
            X_all = teacher_matrix(rt, joiner, used, events, info.kind, items, lists)
            off, X_parts = 0, []
            for ids, pk in zip(lists.ids, picks):
                pos = np.argsort(ids)
                X_parts.append(X_all[off + pos[np.searchsorted(ids[pos], pk)]] if len(pk) else X_all[:0])
                off += len(ids)
            X = np.concatenate(X_parts)
        else:
            X = teacher_matrix(rt, joiner, used, events, info.kind, items, ReleaseLists(lists.users, lists.cut, lists.user_emb, picks))
        scores = rt.score(X, "student_int8").reshape(-1)
        off = 0
        for u, t, pk, full in zip(lists.users.tolist(), lists.cut.tolist(), picks, lists.ids):
            n = len(pk)
            records.append(ServedRecord(
                request_id=f"{seed}-{u}-{t}", ts_ms=int(t), user_id=int(u), release_id=release.release_id, arm="primary",
                method="Recommend", status="ok", degraded_reason=None, latency_ms=0.0, n_candidates=int((full >= 0).sum()),
                item_ids=pk, positions=np.full(n, -1, np.int32), scores=scores[off:off + n].astype(np.float32),
                sources=["ann"] * n, sampled=np.ones(n, bool), features=X[off:off + n], columns=columns))
            off += n
    return sorted(records, key=lambda r: r.ts_ms)


def _write_log(records: list[ServedRecord], root: Path) -> Path:
    """The records as one served-log part (the server's layout: dt=DAY/<release>/part-*.parquet)."""
    rid = records[0].release_id
    day = np.datetime64(records[0].ts_ms, "ms").astype("datetime64[D]")
    d = root / f"dt={day}" / rid
    d.mkdir(parents=True, exist_ok=True)
    table = records_to_table(records)
    table = table.replace_schema_metadata({COLUMNS_KEY: json.dumps(list(records[0].columns)).encode(), RELEASE_KEY: rid.encode()})
    path = d / f"part-{records[0].ts_ms}-0-0.parquet"
    pq.write_table(table, path)
    return root


@dataclass
class _Rows:
    ts: np.ndarray
    X: np.ndarray
    p: np.ndarray

    def window(self, since: int, until: int) -> tuple[np.ndarray, np.ndarray, int]:
        m = (self.ts >= since) & (self.ts < until)
        return self.X[m], self.p[m], int(m.sum())


def _read_back(root: Path) -> tuple[tuple[str, ...], _Rows]:
    (batch,) = read_served_log(root)
    t = batch.table
    mask = t.column("sampled").to_numpy(zero_copy_only=False)
    return batch.columns, _Rows(t.column("ts_ms").to_numpy()[mask], batch.feature_matrix(mask),
                                np.asarray(t.column("score").to_numpy(zero_copy_only=False), np.float32)[mask])


def _truth(columns: tuple[str, ...], shifted: np.ndarray, stable: np.ndarray, p_sh: np.ndarray, p_st: np.ndarray,
           cfg: StudyConfig) -> dict[str, dict]:
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


def run_seed(seed: int, work: Path, cfg: StudyConfig | None = None, thresholds: DriftThresholds | None = None) -> dict:
    cfg, thresholds = cfg or StudyConfig(), thresholds or DriftThresholds()
    from features.datasets import load_info
    from features.simulator import simulate
    from pipeline.train import train_release

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    worlds = {}
    for name, nd in (("shifted", cfg.n_drift_topics), ("stable", 0)):
        simulate(work / f"data_{name}", users=cfg.users, items=cfg.items, days=cfg.days, seed=seed,
                 drift_days=cfg.drift_days, n_drift_topics=nd, drift_boost=cfg.drift_boost)
        worlds[name] = work / f"data_{name}"
    info = load_info(worlds["shifted"])
    shift_ts, end_ts = int(info.params["drift_start_ts"]), int(info.end_ts)
    train_dir = _truncate(worlds["shifted"], work / "data_train", shift_ts)
    release = train_release(train_dir, work / "releases", profile="tiny", seed=0)
    t_train = time.perf_counter()

    rows, columns = {}, None
    for name, d in worlds.items():
        since = shift_ts - cfg.ref_hours * MS_H if name == "shifted" else shift_ts
        recs = _served_rows(release, d, since, end_ts, cfg, seed)
        columns, rows[name] = _read_back(_write_log(recs, work / f"served_{name}"))
    names = (*columns, PREDICTION)

    # ground truth over the whole shift period
    Xs, ps, _ = rows["shifted"].window(shift_ts, end_ts)
    Xn, pn, _ = rows["stable"].window(shift_ts, end_ts)
    truth = _truth(columns, Xs, Xn, ps, pn, cfg)

    # the serving reference: sampled candidate rows of the last ref_hours before the shift
    Xr, pr, n_ref = rows["shifted"].window(shift_ts - cfg.ref_hours * MS_H, shift_ts)
    references = {"release": release.manifest["reference"],
                  "serving": {"features": column_references(Xr, columns, sample=1000),
                              "prediction": histogram_reference(pr, bins=20, sample=1000)}}
    req_ts = np.unique(rows["shifted"].ts)  # one ts per request (sampled rows of a request share it)
    out_refs = {}
    for (ref_name, ref), w in ((r, w) for r in references.items() for w in cfg.windows_h):
        first_alert: dict[str, int | None] = dict.fromkeys(names)
        for end in range(shift_ts + MS_H, end_ts + 1, MS_H):
            X, p, _ = rows["shifted"].window(end - w * MS_H, end)
            for n in drift_report(ref, columns, X, p, thresholds).drifted:
                if first_alert[n] is None:
                    first_alert[n] = end
        delays = {n: None if e is None else {"hours": (e - shift_ts) / MS_H,
                                             "requests": int(((req_ts >= shift_ts) & (req_ts < e)).sum())}
                  for n, e in first_alert.items()}
        alerts_stable, windows = dict.fromkeys(names, 0), 0
        for start in range(shift_ts, end_ts - w * MS_H + 1, w * MS_H):
            X, p, _ = rows["stable"].window(start, start + w * MS_H)
            windows += 1
            for n in drift_report(ref, columns, X, p, thresholds).drifted:
                alerts_stable[n] += 1
        shifted_cols = [n for n in names if truth[n]["shifted"]]
        stable_cols = [n for n in names if not truth[n]["shifted"]]
        out_refs[f"{ref_name}/{w}h"] = {
            "detected": sorted(n for n in shifted_cols if delays[n] is not None),
            "missed": sorted(n for n in shifted_cols if delays[n] is None),
            "alerted_stable_columns_in_shifted_world": sorted(n for n in stable_cols if delays[n] is not None),
            "delays": {n: delays[n] for n in shifted_cols},
            "false_alarms": {"alerts": int(sum(alerts_stable.values())), "windows": windows, "columns": len(names),
                             "rate": sum(alerts_stable.values()) / (windows * len(names)) if windows else None,
                             "by_column": {n: c for n, c in alerts_stable.items() if c}},
        }
    return {"seed": seed, "release_id": release.release_id, "shift_start_ms": shift_ts, "end_ms": end_ts,
            "drift_topics": info.params["drift_topics"], "columns": len(names),
            "rows": {"shifted": len(rows["shifted"].ts), "stable": len(rows["stable"].ts), "serving_reference": n_ref},
            "requests_per_hour": float(len(req_ts) / ((end_ts - shift_ts + cfg.ref_hours * MS_H) / MS_H)),
            "truth": truth, "shifted_columns": sorted(n for n in names if truth[n]["shifted"]),
            "references": out_refs, "seconds": {"train": round(t_train - t0, 1), "total": round(time.perf_counter() - t0, 1)}}


def _summary(seeds: list[dict]) -> dict:
    out = {}
    for ref in seeds[0]["references"]:
        alerts = sum(s["references"][ref]["false_alarms"]["alerts"] for s in seeds)
        cells = sum(s["references"][ref]["false_alarms"]["windows"] * s["references"][ref]["false_alarms"]["columns"] for s in seeds)
        n_shifted = sum(len(s["shifted_columns"]) for s in seeds)
        n_detected = sum(len(s["references"][ref]["detected"]) for s in seeds)
        n_stable = sum(s["columns"] - len(s["shifted_columns"]) for s in seeds)
        n_stable_alert = sum(len(s["references"][ref]["alerted_stable_columns_in_shifted_world"]) for s in seeds)
        hours = [d["hours"] for s in seeds for d in s["references"][ref]["delays"].values() if d is not None]
        reqs = [d["requests"] for s in seeds for d in s["references"][ref]["delays"].values() if d is not None]
        out[ref] = {"false_alarm_rate": alerts / cells if cells else None, "false_alarms": alerts, "feature_windows": cells,
                    "shifted_detected": n_detected, "shifted_total": n_shifted,
                    "stable_alerted_in_shifted_world": n_stable_alert, "stable_total": n_stable,
                    "delay_hours_median": float(np.median(hours)) if hours else None,
                    "delay_hours_max": float(np.max(hours)) if hours else None,
                    "delay_requests_median": float(np.median(reqs)) if reqs else None}
    return out


def run_study(seeds: list[int], work: Path, cfg: StudyConfig | None = None, thresholds: DriftThresholds | None = None) -> dict:
    cfg, thresholds = cfg or StudyConfig(), thresholds or DriftThresholds()
    per_seed = [run_seed(s, work / f"seed{s}", cfg, thresholds) for s in seeds]
    return {"config": cfg.to_dict(), "thresholds": thresholds.to_dict(), "seeds": per_seed, "summary": _summary(per_seed)}


def main(argv: list[str] | None = None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--users", type=int, default=StudyConfig.users)
    ap.add_argument("--out", default="bench/results/drift.json")
    ap.add_argument("--work", default=None, help="keep the worlds, releases and served logs here (default: a temporary folder)")
    a = ap.parse_args(argv)
    cfg = StudyConfig(users=a.users)
    if a.work:
        res = run_study(a.seeds, Path(a.work), cfg)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            res = run_study(a.seeds, Path(tmp), cfg)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(json.dumps(res["summary"], sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
