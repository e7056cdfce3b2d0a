"""The freshness trade, measured: what each serving mode costs and what staleness it serves, for
a light feature set (user_activity: one record per request) and a heavy one (user_creator:
one record per candidate's creator), on the benchmark's simulated data.

    python -m bench.freshness_trade --out bench/results/freshness_trade.json [--servers] [--rounds 2] [--work DIR]

In process (always):
  * write cost per event: the StreamingIngestor folding the log's events (streaming) or
    appending them raw (on_read), one set at a time, 1,000-event batches, memory store; and a
    full materialisation's cost per entity written (materialized);
  * store bytes per entity: Redis MEMORY USAGE of the records a mode keeps (state + served
    values, or the raw-event record), averaged over a sample, on a private redis-server;
  * read cost per request: the set's records for one request (1 for the light set, the
    distinct creators of 200 sampled candidates for the heavy one) read from the memory store
    and decoded as the server does, mean and p99 over requests;
  * served staleness: for requests at the log's impression times in its last two days, the
    age of the values served (request time - feature timestamp): streaming and on_read serve
    every event before the request, a cadence of N serves the state of the last run.
With --servers, the serving study's fixed rate and capacity search (bench/serving.py) on
`parity serve` child processes: the product as shipped, then each set on_read, then both
materialised, in rounds; the p99 a mode adds is its p99 minus the plain server's of its round.

The `sets` part of the JSON is what `parity features plan --trade` reads.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.report import machine, write_json

__all__ = ["main", "run_in_process", "SETS"]

SETS = ("user_activity", "user_creator")  # light, heavy
BATCH = 1_000
INGEST_EVENTS = 200_000
REQUESTS = 400
CANDIDATES = 200
CADENCES = {"15m": 15 * 60_000, "1h": 3_600_000, "6h": 6 * 3_600_000}


def _say(msg: str) -> None:
    print(f"[freshness] {msg}", flush=True)


def _ingest(sets, events, mode_spec: str | None):
    """(seconds per event, store) after ingesting `events` with every set in `mode_spec` (None: streaming)."""
    from features.modes import SetMode, save_mode
    from features.online.memory import MemoryStore
    from features.streaming import StreamingIngestor

    store = MemoryStore("trade")
    if mode_spec is not None:
        for fs in sets:
            save_mode(store, fs, SetMode.parse(mode_spec))
    ing = StreamingIngestor(store, sets, name="trade", allowed_lateness_ms=10**12, dedupe_ttl_ms=10**13)
    t = time.perf_counter()
    for a in range(0, len(events), BATCH):
        ing.ingest(events.take(np.arange(a, min(a + BATCH, len(events)))))
    return (time.perf_counter() - t) / len(events), store


def _redis_bytes(store_records: dict, url: str, entities: int) -> float:
    """MEMORY USAGE of these records written to a real Redis (key -> bytes), per entity."""
    import redis

    c = redis.Redis.from_url(url)
    try:
        c.flushall()
        pipe = c.pipeline(transaction=False)
        for k, v in store_records.items():
            pipe.set(k, v)
        pipe.execute()
        sizes = [c.memory_usage(k) for k in store_records]
        return float(np.sum(sizes)) / max(entities, 1)
    finally:
        c.close()


def _records_by_entity(store, fs, suffixes: Sequence[str]) -> dict[str, dict[str, bytes]]:
    """entity id -> {key string: record} for the keys of `fs` with these version suffixes."""
    out: dict[str, dict[str, bytes]] = {}
    keys = [k for k in store.iter_keys(fs.name) if k.version in {fs.version + s for s in suffixes}]
    for k, v in zip(keys, store.get_many(keys)):
        if v is not None:
            out.setdefault(k.entity_id, {})[f"t:{k.feature_set}:{k.version}:{k.entity_type}:{k.entity_id}"] = v
    return out


def _read_cost(store, fs, modes, codes_per_request: list[np.ndarray], now: int) -> tuple[float, float]:
    """(mean ms, p99 ms) of reading and decoding one request's records of `fs` as FeatureLookup does."""
    from features.lookup import FeatureLookup, LookupRequest

    lookup = FeatureLookup(store, [fs], modes=modes)
    for codes in codes_per_request:  # the steady state: quiet entities' values records repaired once (the server does it off the request path)
        lookup.read_many([LookupRequest(fs.name, codes)], now, repair=True)
    ts = []
    for codes in codes_per_request:
        t = time.perf_counter()
        lookup.read_many([LookupRequest(fs.name, codes)], now)
        ts.append(time.perf_counter() - t)
    ms = np.asarray(ts) * 1000.0
    return float(ms.mean()), float(np.percentile(ms, 99))


def _staleness(fs, events, requests_t: np.ndarray, requests_code: np.ndarray, cadence_ms: int | None) -> tuple[float, float]:
    """(p50, p99) ms of request time minus the feature timestamp served (found values only)."""
    m = fs.event_mask(events)
    codes, ts = fs.entity.codes(events)[0][m], events.ts[m]
    order = np.lexsort((ts, codes))
    codes, ts = codes[order], ts[order]
    asof = requests_t if cadence_ms is None else (requests_t // cadence_ms) * cadence_ms
    lo = np.searchsorted(codes, requests_code, side="left")
    hi = np.searchsorted(codes, requests_code, side="right")
    ages = []
    for a, b, t, r in zip(lo.tolist(), hi.tolist(), asof.tolist(), requests_t.tolist()):
        k = a + int(np.searchsorted(ts[a:b], t, side="left"))  # events strictly before the as-of time
        if k > a:
            ages.append(r - int(ts[k - 1]))
    if not ages:
        return float("nan"), float("nan")
    q = np.percentile(ages, [50, 99])
    return float(q[0]), float(q[1])


def run_in_process(data: Path, redis_url: str | None) -> dict:
    from features.datasets import load_info
    from features.events import EventType
    from features.eventlog import EventLog
    from features.materialize import materialize
    from features.modes import ModePlan, SetMode
    from features.online.memory import MemoryStore
    from features.repo import feature_sets
    from features.served_values import VALUES_SUFFIX

    info = load_info(data)
    sets = {fs.name: fs for fs in feature_sets(info.kind, info.n_topics)}
    events = EventLog(data / "events").read().deduplicated().sorted()
    ingest = events.take(np.arange(max(0, len(events) - INGEST_EVENTS), len(events)))  # the log's last events, in order
    now = int(events.ts.max()) + 1
    rng = np.random.default_rng(0)
    from features.datasets import read_items

    items = read_items(data)
    item_ids = np.asarray(items.column("item_id").to_numpy(), dtype=np.int64)
    creators = np.asarray(items.column("creator_id").to_numpy(), dtype=np.int64)
    imp = np.flatnonzero((events.type == int(EventType.IMPRESSION)) & (events.ts >= now - 2 * 86_400_000))
    pick = np.sort(rng.choice(imp, size=min(REQUESTS, len(imp)), replace=False))
    users, times = events.user_id[pick].astype(np.int64), events.ts[pick]
    shown_creator = events.creator_id[pick].astype(np.int64)  # the pair a request reads for the impressed item
    out: dict = {"sets": {}, "detail": {}}
    for name in SETS:
        fs = sets[name]
        _say(f"{name}: write cost, bytes, read cost, staleness")
        if name == "user_activity":
            req_codes = [np.array([u]) for u in users.tolist()]
        else:
            req_codes = [(int(u) << 32) | np.unique(creators[rng.choice(len(item_ids), CANDIDATES, replace=False)]) for u in users.tolist()]
        detail: dict = {"records_per_request": float(np.mean([len(c) for c in req_codes]))}
        rows: dict[str, dict] = {}
        # streaming: fold every event, state + served-values records
        s_per_ev, st = _ingest([fs], ingest, None)
        mean, p99 = _read_cost(st, fs, ModePlan({}), req_codes, now)
        recs = dict(list(_records_by_entity(st, fs, ("", VALUES_SUFFIX)).items())[:1000])
        nbytes = _redis_bytes({k: v for d in recs.values() for k, v in d.items()}, redis_url, len(recs)) if redis_url else float("nan")
        rows["streaming"] = {"write_s_per_event": s_per_ev, "materialize_s_per_entity": 0.0, "read_p99_added_ms": 0.0,
                             "read_ms_per_request": mean, "read_p99_ms": p99, "bytes_per_entity": nbytes}
        # on_read: append raw events, compute on read
        for cap in (64, 256):
            s_per_ev, st = _ingest([fs], ingest, f"on_read:cap={cap}")
            mean, p99 = _read_cost(st, fs, ModePlan({name: SetMode.parse(f"on_read:cap={cap}")}), req_codes, now)
            recs = dict(list(_records_by_entity(st, fs, ("",)).items())[:1000])
            nbytes = _redis_bytes({k: v for d in recs.values() for k, v in d.items()}, redis_url, len(recs)) if redis_url else float("nan")
            rows[f"on_read:cap={cap}"] = {"write_s_per_event": s_per_ev, "materialize_s_per_entity": 0.0,
                                          "read_p99_added_ms": max(0.0, p99 - rows["streaming"]["read_p99_ms"]),
                                          "read_ms_per_request": mean, "read_p99_ms": p99, "bytes_per_entity": nbytes}
        # materialized: a full run's cost per entity written; reads as streaming
        store = MemoryStore("trade-mat")
        t = time.perf_counter()
        rep = materialize(EventLog(data / "events"), store, [fs], full=True, mark_window_ms=0)[0]
        per_entity = (time.perf_counter() - t) / max(rep.entities_written, 1)
        rows["materialized"] = {**rows["streaming"], "write_s_per_event": 0.0, "materialize_s_per_entity": per_entity}
        # served staleness per mode
        codes = users if name == "user_activity" else (users << 32) | shown_creator
        stale = {"streaming": _staleness(fs, events, times, codes, None)}
        for label, ms in CADENCES.items():
            stale[f"materialized:{label}"] = _staleness(fs, events, times, codes, ms)
        detail["served_staleness_ms"] = {k: {"p50": v[0], "p99": v[1]} for k, v in stale.items()}
        detail["materialize_entities"] = rep.entities_written
        out["sets"][name] = {"streaming": rows["streaming"], "materialized": rows["materialized"], "on_read": rows["on_read:cap=256"]}
        out["detail"][name] = {**detail, "modes": rows}
    out["events_ingested"] = len(ingest)
    return out


SERVER_VARIANTS = {
    "plain": "",
    "on_read_light": "user_activity=on_read",
    "on_read_heavy": "user_creator=on_read",
    "materialized": "user_activity=materialized:1h,user_creator=materialized:1h",
}


def run_servers(cfg, work: Path, rounds: int) -> list[dict]:
    from bench.change_overhead import TOKEN
    from bench.latency import UserMix
    from bench.serving import ServerProcess, _measure, capacity_search

    data, release = _prepared(work, cfg)
    user_ids = UserMix.from_data_dir(data).sample(int(max(cfg.fixed_qps * cfg.fixed_seconds, 100_000)), seed=cfg.seed)
    runs = []
    for r in range(rounds):
        for variant, modes in SERVER_VARIANTS.items():
            _say(f"round {r + 1}/{rounds}: {variant}")
            argv = [sys.executable, "-m", "parity", "serve", "--release", str(release), "--events", str(data), "--store", "memory",
                    "--admin-token", TOKEN] + (["--modes", modes] if modes else [])
            with ServerProcess(argv, work / f"server-{variant}-{r}.log") as srv:
                run_ = {"round": r, "variant": variant, "modes": modes}
                if cfg.warmup_seconds:
                    _measure(srv, user_ids, cfg, cfg.fixed_qps / 2, cfg.warmup_seconds)
                run_["fixed"] = _measure(srv, user_ids, cfg, cfg.fixed_qps, cfg.fixed_seconds)
                cap, steps = capacity_search(lambda q: _measure(srv, user_ids, cfg, q, cfg.step_seconds), cfg)
                run_["capacity_qps"] = cap
            runs.append(run_)
    return runs


def _prepared(work: Path, cfg) -> tuple[Path, Path]:
    from bench.serving import prepared

    data, release, _ = prepared(work, cfg)
    return data, release


START = "<!-- generated:freshness:start -->"
END = "<!-- generated:freshness:end -->"


def _ms(x: float) -> str:
    if x != x:
        return "—"
    if x >= 3_600_000:
        return f"{x / 3_600_000:.1f} h"
    if x >= 60_000:
        return f"{x / 60_000:.1f} min"
    return f"{x / 1000:.1f} s"


def render(res: dict) -> str:
    """The freshness section of bench/RESULTS.md from this script's JSON."""
    lines = [START, "", "### Freshness as a choice: what each serving mode costs and serves", "",
             f"`{res.get('command', 'python -m bench.freshness_trade')}` (then `python -m bench.freshness_trade --render {{json}} bench/RESULTS.md`); "
             f"{res['events_ingested']:,} of the log's last events ingested per mode, 1,000-event batches, memory store; bytes from a private "
             f"redis-server's MEMORY USAGE; read = one request's records of the set read and decoded as the server does (in process, "
             f"memory store, {REQUESTS} requests). Run {res.get('started_at', '?')}.", "",
             "| set (records per request) | mode | write per event | materialise per entity | read per request, mean / p99 | bytes per entity | served staleness p50 / p99 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, d in res["detail"].items():
        st = d["served_staleness_ms"]
        for mode, r in d["modes"].items():
            if mode == "materialized":
                for label in CADENCES:
                    s_ = st.get(f"materialized:{label}", {})
                    lines.append(f"| {name} ({d['records_per_request']:.0f}) | materialized:{label} | — | {r['materialize_s_per_entity'] * 1e6:.0f} µs | "
                                 f"{r['read_ms_per_request']:.3f} / {r['read_p99_ms']:.3f} ms | {r['bytes_per_entity']:.0f} | {_ms(s_.get('p50', float('nan')))} / {_ms(s_.get('p99', float('nan')))} |")
                continue
            s_ = st["streaming"]
            lines.append(f"| {name} ({d['records_per_request']:.0f}) | {mode} | {r['write_s_per_event'] * 1e6:.1f} µs | — | "
                         f"{r['read_ms_per_request']:.3f} / {r['read_p99_ms']:.3f} ms | {r['bytes_per_entity']:.0f} | {_ms(s_['p50'])} / {_ms(s_['p99'])} |")
    if res.get("servers"):
        lines += ["", f"Serving study per mode (memory store, fixed {res['config']['fixed_qps']:g} req/s, capacity = highest rate with p99 <= "
                      f"{res['config']['p99_limit_ms']:g} ms; ratios to the plain server of the same round; median and range over rounds):", "",
                  "| server | p99 at fixed rate (ms) | p99 added (ms) | capacity (req/s) | capacity ratio |", "|---|---:|---:|---:|---:|"]
        import statistics

        def spread(xs, fmt):
            xs = [x for x in xs if x == x]
            if not xs:
                return "—"
            m = statistics.median(xs)
            return fmt.format(m) if len(xs) == 1 else f"{fmt.format(m)} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"

        for v, modes in SERVER_VARIANTS.items():
            rs = [r for r in res["servers"] if r["variant"] == v]
            lines.append(f"| {modes or 'as shipped (all streaming)'} | {spread([r['fixed']['p99_ms'] for r in rs], '{:.2f}')} | "
                         f"{spread([r.get('p99_added_ms', float('nan')) for r in rs], '{:+.2f}')} | {spread([r['capacity_qps'] for r in rs], '{:.0f}')} | "
                         f"{spread([r.get('capacity_ratio', float('nan')) for r in rs], '{:.2f}×')} |")
    lines += ["", END]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.serving import ServingBenchConfig

    p = argparse.ArgumentParser(prog="python -m bench.freshness_trade", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/freshness_trade.json")
    p.add_argument("--work", default=None, help="reuse this folder's data and release (bench.change_overhead's --work layout)")
    p.add_argument("--servers", action="store_true", help="also run the serving study per mode (slow: ~2 min per variant and round)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small data, short runs (figures not for RESULTS.md)")
    p.add_argument("--render", nargs=2, metavar=("JSON", "RESULTS_MD"), help="only splice the section of an earlier run into RESULTS_MD")
    a = p.parse_args(argv)
    if a.render:
        from bench.report import update_results

        update_results(Path(a.render[1]), render(json.loads(Path(a.render[0]).read_text())), START, END)
        return 0
    cfg = ServingBenchConfig.quick() if a.quick else replace(ServingBenchConfig(), bisect_steps=2)
    tmp = tempfile.TemporaryDirectory(prefix="parity-freshness-") if a.work is None else None
    work = Path(tmp.name) if tmp else Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        from tests.redis_server import RedisServer

        data, _ = _prepared(work, cfg)
        result = {"config": asdict(cfg), "machine": machine(), "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "command": "python -m bench.freshness_trade " + " ".join(argv if argv is not None else sys.argv[1:])}
        with RedisServer() as rs:
            result.update(run_in_process(data, rs.url))
        write_json(Path(a.out), result)
        if a.servers:
            result["servers"] = run_servers(cfg, work, a.rounds)
            plain = {r["round"]: r for r in result["servers"] if r["variant"] == "plain"}
            for r in result["servers"]:
                base = plain.get(r["round"])
                if base:
                    r["p99_added_ms"] = r["fixed"]["p99_ms"] - base["fixed"]["p99_ms"]
                    r["capacity_ratio"] = r["capacity_qps"] / base["capacity_qps"] if base["capacity_qps"] else float("nan")
            for name, variant in (("user_activity", "on_read_light"), ("user_creator", "on_read_heavy")):
                added = [r["p99_added_ms"] for r in result["servers"] if r["variant"] == variant and "p99_added_ms" in r]
                if added:
                    result["sets"][name]["on_read"]["read_p99_added_ms"] = max(0.0, float(np.median(added)))
        result["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_json(Path(a.out), result)
        _say(f"wrote {a.out}")
    finally:
        if tmp:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
