"""`parity features ...`: inspect, materialise, verify, stream, read, erase, retire."""
from __future__ import annotations

import argparse
import json
import time
import uuid

import numpy as np

from parity.engine_args import add_engine_args, engine_from_args
from parity.output import Output
from parity.workspace import existing_data_dir, open_workspace

STORE_HELP = "online store: memory or redis://HOST:PORT/DB (default memory)"


def register(sub: argparse._SubParsersAction, positive, nonneg) -> None:
    f = sub.add_parser("features", help="the feature store").add_subparsers(dest="features_command", required=True, metavar="ACTION")

    p = f.add_parser("list", help="feature sets, versions and columns for a data dir")
    p.add_argument("--events", required=True, help="data dir (or its events/ folder)")
    p.set_defaults(func=_list)

    p = f.add_parser("lineage", help="where a feature set comes from: source events, definition, version")
    p.add_argument("name", help="feature set name")
    p.add_argument("--events", required=True, help="data dir (or its events/ folder)")
    p.add_argument("--store", default=None, help=STORE_HELP + "; shows the materialisation watermark")
    p.set_defaults(func=_lineage)

    p = f.add_parser("materialize", help="offline views and online states from the event log (idempotent)")
    p.add_argument("--events", required=True, help="data dir (or its events/ folder)")
    p.add_argument("--store", default="memory", help=STORE_HELP)
    p.add_argument("--namespace", default="parity", help="key namespace in the store (default parity)")
    p.add_argument("--full", action="store_true", help="recompute every entity instead of those with events since the watermark")
    p.add_argument("--until", type=nonneg("--until"), default=None, help="materialise events with ts < UNTIL (ms); default: the whole log")
    p.add_argument("--no-offline", action="store_true", help="skip rebuilding the offline views")
    add_engine_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--due", action="store_true",
                   help="one scheduling step for sets served materialized:EVERY (see `features mode`): run those whose cadence "
                        "boundary has passed, claimed so two schedulers never both run one; for cron or an orchestrator")
    g.add_argument("--every", action="store_true", help="keep running: materialise each materialized set at its cadence until stopped")
    p.set_defaults(func=_materialize, outputs=lambda a: [] if a.no_offline or a.due or a.every else _in_data_dir(a, "offline"))

    p = f.add_parser("mode", help="show or set how each feature set is kept online (streaming, materialized:EVERY, on_read)",
                     description="Without assignments: each set's serving mode as stored. With SET=MODE,...: saves the modes "
                     "to the store (every server worker and ingestor reads them there) and leaves the store readable in them.")
    p.add_argument("assign", nargs="?", default="", help="e.g. user_activity=on_read,user_creator=materialized:15m")
    p.add_argument("--events", required=True, help="data dir (or its events/ folder)")
    p.add_argument("--store", default="memory", help=STORE_HELP)
    p.add_argument("--namespace", default="parity", help="key namespace in the store (default parity)")
    p.set_defaults(func=_mode)

    p = f.add_parser("plan", help="recommend a serving mode per feature set from measured costs and a backtest",
                     description="Reads the event log for each set's event rate and the entities a cadence window touches, "
                     "the benchmark's measured costs per mode (bench/results/freshness_trade.json) and a backtest's staleness "
                     "tolerance (`parity backtest --json`), and picks per set the cheapest mode that keeps NDCG@10 within 1 %% "
                     "and the request p99 inside the budget. Table, then a JSON last line.")
    p.add_argument("--events", required=True, help="data dir (or its events/ folder)")
    p.add_argument("--qps", type=positive("--qps"), required=True, help="requests per second the servers answer")
    p.add_argument("--trade", default="bench/results/freshness_trade.json", help="measured costs per set and mode (default %(default)s)")
    p.add_argument("--backtest", default=None, help="`parity backtest --json` output (its tolerance per set); without it no staleness is tolerated")
    p.add_argument("--latency-budget-ms", type=positive("--latency-budget-ms"), default=5.0,
                   help="request p99 a set's read may add (default 5)")
    p.set_defaults(func=_plan)

    p = f.add_parser(
        "verify",
        help="prove parity: replay the log through the streaming path and compare with the batch point-in-time values",
        description="Replays the log into a fresh online store and, at N probe times, compares every entity's online "
        "read with the batch point-in-time value. Last line: JSON {checked, mismatches, max_abs_diff}; exit 1 if any "
        "mismatch or nothing was checked.",
    )
    p.add_argument("--events", required=True, help="data dir (or its events/ folder)")
    p.add_argument("--probes", type=positive("--probes"), default=10, help="probe times per entity (default 10)")
    p.add_argument("--store", default="memory", help=STORE_HELP + "; a fresh namespace is used and removed")
    p.add_argument("--seed", type=nonneg("--seed"), default=0, help="seed for the probe times (default 0)")
    p.add_argument("--modes", default="", help="serve sets this way during the replay: SET=MODE,... (streaming, materialized:EVERY, "
                   "on_read[:cap=N]); a materialized set must equal the batch path as of its last cadence run")
    p.set_defaults(func=_verify)

    p = f.add_parser("stream", help="consume events from a Redis Stream (consumer group) into the online store")
    p.add_argument("--redis", required=True, help="redis://HOST:PORT/DB holding the stream")
    p.add_argument("--stream", required=True, help="stream name")
    p.add_argument("--events", required=True, help="data dir (for the dataset kind and its feature sets)")
    p.add_argument("--store", default=None, help="online store (default: the --redis server)")
    p.add_argument("--namespace", default="parity", help="key namespace (default parity)")
    p.add_argument("--group", default="parity-features", help="consumer group (default parity-features)")
    p.add_argument("--consumer", default="consumer-1", help="consumer name within the group (default consumer-1)")
    p.add_argument("--batch", type=positive("--batch"), default=500, help="messages per read (default 500)")
    p.add_argument("--lateness-ms", type=nonneg("--lateness-ms"), default=3_600_000, help="allowed lateness in ms (default 1 h)")
    p.add_argument("--dead-letter-stream", default=None, help="dead-letter stream (default STREAM:dead)")
    p.add_argument("--claim-idle-ms", type=nonneg("--claim-idle-ms"), default=30_000, help="take over messages a dead consumer left pending this long (default 30000)")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many seconds without messages")
    p.add_argument("--max-messages", type=positive("--max-messages"), default=None, help="exit after handling this many messages")
    p.add_argument("--max-future-ms", type=nonneg("--max-future-ms"), default=300_000,
                   help="refuse events whose ts is further ahead of this machine's clock (default 300000: 5 min)")
    p.add_argument("--max-per-item", type=positive("--max-per-item"), default=20,
                   help="contribution cap: events per (user, item, type) per window (default 20)")
    p.add_argument("--max-per-user", type=positive("--max-per-user"), default=2000,
                   help="contribution cap: events per user per window (default 2000)")
    p.add_argument("--rate-window-ms", type=positive("--rate-window-ms"), default=3_600_000,
                   help="contribution-cap window in event time (default 3600000: 1 h)")
    p.add_argument("--no-rate-limit", action="store_true", help="turn the contribution caps off (e.g. for a trusted replay)")
    p.set_defaults(func=_stream)

    p = f.add_parser("publish", help="append a data dir's events to a Redis Stream (for replays and demos)")
    p.add_argument("--redis", required=True, help="redis://HOST:PORT/DB")
    p.add_argument("--stream", required=True, help="stream name")
    p.add_argument("--events", required=True, help="data dir (or its events/ folder)")
    p.add_argument("--limit", type=positive("--limit"), default=None, help="publish only the first N events")
    p.set_defaults(func=_publish)

    p = f.add_parser("read", help="read one entity's features online, with feature timestamp and staleness")
    p.add_argument("--events", required=True, help="data dir (for the feature sets)")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--namespace", default="parity", help="key namespace (default parity)")
    p.add_argument("--set", dest="set_name", required=True, help="feature set name")
    p.add_argument("--id", dest="entity_id", required=True, help='entity id: "42", or "42|7" for a pair')
    p.add_argument("--now", type=nonneg("--now"), default=None, help="read as of this time (ms); default now")
    p.set_defaults(func=_read)

    p = f.add_parser("freshness", help="staleness of every online record per feature set (p50/p95/max, expired)")
    p.add_argument("--events", required=True, help="data dir (for the feature sets)")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--namespace", default="parity", help="key namespace (default parity)")
    p.add_argument("--now", type=nonneg("--now"), default=None, help="as of this time (ms); default now")
    p.set_defaults(func=_freshness)

    p = f.add_parser("delete-user", help="erase one user's data from the event log, the offline and the online store (audited)")
    p.add_argument("--events", required=True, help="data dir")
    p.add_argument("--user", type=nonneg("--user"), required=True, help="user id")
    p.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    p.add_argument("--store", default="memory", help=STORE_HELP)
    p.add_argument("--namespace", default="parity", help="key namespace (default parity)")
    p.set_defaults(func=_delete_user, outputs=lambda a: _in_data_dir(a, ""))

    p = f.add_parser("retire", help="stop materialising a feature set version and delete its online keys")
    p.add_argument("name", help="feature set name")
    p.add_argument("--events", required=True, help="data dir")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--namespace", default="parity", help="key namespace (default parity)")
    p.set_defaults(func=_retire, outputs=lambda a: _in_data_dir(a, "offline"))


def _in_data_dir(args: argparse.Namespace, sub: str) -> list[Output]:
    """An output inside --events' data dir (once it exists: else the command reports the bad --events)."""
    d = existing_data_dir(args.events)
    return [Output.of(d / sub if sub else d)] if d is not None else []


def _store(spec: str, namespace: str):
    from features.online import open_store

    # Batch commands move megabytes per commit: give them a patient socket timeout
    # (the server's request path keeps the store's short default).
    opts = {"socket_timeout_s": 30.0} if spec.startswith(("redis://", "rediss://")) else {}
    return open_store(spec, namespace=namespace, **opts)


def _list(args: argparse.Namespace) -> int:
    ws = open_workspace(args.events)
    from features.state import StateLayout

    for fs in ws.sets:
        lay = StateLayout(fs)
        print(f"{fs.name} {fs.version}  entity={fs.entity.name}{list(fs.entity.keys)}  ttl={fs.ttl_ms // 3_600_000} h  record={lay.record_size} B")
        for f in fs.features:
            w = f" window={f.window.duration_ms // 60_000} min tile={f.window.tile_ms // 60_000} min" if f.window else ""
            h = f" half_life={f.half_life_ms // 60_000} min" if f.half_life_ms else ""
            d = f" dim={f.dim}" if f.dim > 1 else ""
            print(f"  {f.name:<22} {f.agg.value:<15} source={f.source}{w}{h}{d} default={f.default}")
    return 0


def _lineage(args: argparse.Namespace) -> int:
    ws = open_workspace(args.events)
    fs = ws.feature_set(args.name)
    events = ws.log.read(must_exist=True)
    m = fs.event_mask(events)
    per_source = {s.name: int((s.mask(events) & m).sum()) for s in fs.sources}
    out = {
        "feature_set": fs.name,
        "version": fs.version,
        "entity": {"name": fs.entity.name, "keys": list(fs.entity.keys)},
        "ttl_ms": fs.ttl_ms,
        "description": fs.description,
        "sources": [
            {"name": s.name, "event_types": [t.name.lower() for t in s.event_types], "value": s.value, "events_in_log": per_source[s.name]}
            for s in fs.sources
        ],
        "source_log": str(ws.log.root),
        "events_in_log": int(m.sum()),
        "entities_in_log": int(len(np.unique(fs.entity.codes(events.take(np.flatnonzero(m)))[0]))),
        "online_key": f"{{namespace}}:{fs.name}:{fs.version}:{fs.entity.name}:{{entity_id}}",
        "offline_view": str(ws.offline.root / fs.name / fs.version / "events.parquet"),
        "pii_inputs": list(fs.pii_inputs),
        "definition": fs.definition(),
    }
    if ws.offline.has(fs):
        out["offline_view_info"] = ws.offline.info(fs).__dict__
    if args.store:
        from features.materialize import stored_watermark

        with _store(args.store, "parity") as store:
            out["materialized_until_ts"] = stored_watermark(store, fs)
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def _materialize(args: argparse.Namespace) -> int:
    from features.materialize import materialize

    if args.due or args.every:
        return _cadence(args)
    ws = open_workspace(args.events)
    t = time.perf_counter()
    if not args.no_offline:
        for v in ws.offline.build(ws.log, ws.sets, until_ts=args.until):
            print(f"offline {v.feature_set} {v.version}: {v.rows} events -> {ws.offline.root / v.feature_set / v.version}")
    # On Ray the partitions compute the records and this process writes them (features/engine_ray.py says why)
    with engine_from_args(args, "parity features materialize") as engine, _store(args.store, args.namespace) as store:
        if engine.name != "local":
            print(f"engine {engine.name}: {engine.workers} workers, {engine.n_partitions} partitions")
        for r in materialize(ws.log, store, ws.sets, until_ts=args.until, full=args.full, engine=engine):
            if r.mode == "retired":
                print(f"online {r.feature_set} {r.version}: retired, skipped")
            else:
                print(f"online {r.feature_set} {r.version}: {r.mode} [{r.from_ts}, {r.until_ts}) {r.entities_written} entities written from {r.events_read} events")
    print(f"done in {time.perf_counter() - t:.1f} s")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from features.modes import ModePlan
    from features.verify import verify_parity

    ws = open_workspace(args.events)
    try:
        modes = ModePlan.parse(args.modes, [fs.name for fs in ws.sets]) if args.modes else None
    except ValueError as exc:
        raise SystemExit(f"parity features verify: error: --modes: {exc}") from None
    t = time.perf_counter()
    events = ws.log.read(must_exist=True)
    ns = f"verify-{uuid.uuid4().hex[:10]}"
    with _store(args.store, ns) as store:
        try:
            rep = verify_parity(events, ws.sets, store, probes=args.probes, seed=args.seed, modes=modes)
        finally:
            store.clear_namespace()  # the scratch namespace: records, dedupe markers, metadata
    how = f" (modes {args.modes})" if args.modes else ""
    print(f"replayed {rep.events} events through the streaming path{how}; {rep.probes} probe times ({time.perf_counter() - t:.1f} s)")
    for s in rep.sets:
        print(f"  {s.feature_set:<16} {s.version}  entities={s.entities:<7} checked={s.checked:<9} mismatches={s.mismatches}  max_abs_diff={s.max_abs_diff:.3g}")
        for e in s.examples:
            print(f"    mismatch: {e}")
    print(json.dumps(rep.summary()))
    return 1 if rep.mismatches > 0 or rep.checked == 0 else 0


def _stream(args: argparse.Namespace) -> int:
    import redis

    from features.catalog import ItemCatalog
    from features.contribution import ContributionLimiter, ContributionLimits
    from features.datasets import read_items
    from features.event_rules import EventRules
    from features.redis_stream import RedisStreamConsumer
    from features.streaming import StreamingIngestor

    ws = open_workspace(args.events)
    rules = EventRules.from_dataset(ws.info, ItemCatalog.from_table(read_items(ws.data_dir)), max_future_ms=args.max_future_ms)
    if args.redis.startswith(("redis+cluster://", "rediss+cluster://")):  # a stream per master: name it with a hash tag
        from redis.cluster import RedisCluster

        scheme, rest = args.redis.split("://", 1)
        client = RedisCluster.from_url(scheme.split("+")[0] + "://" + rest)
    else:
        client = redis.Redis.from_url(args.redis)
    store = _store(args.store or args.redis, args.namespace)
    # a hash-tagged stream name ("events:{s0}") holds braces, which metadata names may not
    ing = StreamingIngestor(store, ws.sets, name="stream-" + args.stream.replace("{", "").replace("}", ""), allowed_lateness_ms=args.lateness_ms)
    limiter = None if args.no_rate_limit else ContributionLimiter(
        store, ContributionLimits(max_per_item=args.max_per_item, max_per_user=args.max_per_user, window_ms=args.rate_window_ms))
    cons = RedisStreamConsumer(client, args.stream, ing, group=args.group, consumer=args.consumer, batch_size=args.batch,
        dead_letter_stream=args.dead_letter_stream, claim_idle_ms=args.claim_idle_ms, rules=rules, limiter=limiter,
    )
    import signal

    signal.signal(signal.SIGTERM, lambda *_: cons.stop())
    try:
        st = cons.run(max_messages=args.max_messages, idle_exit_s=args.idle_exit)
    finally:
        store.close()
    wm = ing.stats().watermark
    print(json.dumps({**st.to_json(), "dead_lettered": st.dead_lettered, "watermark": wm}))
    return 0


def _publish(args: argparse.Namespace) -> int:
    import redis

    from features.redis_stream import publish_events

    ws = open_workspace(args.events)
    events = ws.log.read(must_exist=True)
    if args.limit:
        events = events.take(np.arange(min(args.limit, len(events))))
    n = publish_events(redis.Redis.from_url(args.redis), args.stream, events)
    print(f"published {n} events to {args.stream}")
    return 0


def _read(args: argparse.Namespace) -> int:
    from features.lookup import FeatureLookup

    ws = open_workspace(args.events)
    fs = ws.feature_set(args.set_name)
    code = fs.entity.parse_key_id(args.entity_id)
    now = args.now if args.now is not None else int(time.time() * 1000)
    with _store(args.store, args.namespace) as store:
        res = FeatureLookup(store, [fs]).read(fs.name, [code], now)
    fr = res.frame
    print(json.dumps({
        "feature_set": fs.name, "version": fs.version, "entity_id": args.entity_id, "as_of_ms": now,
        "found": bool(res.found[0]), "feature_ts": int(fr.feature_ts[0]), "staleness_ms": int(res.staleness_ms[0]),
        "values": {c: float(fr.values[0, j]) for j, c in enumerate(fr.columns)},
        "missing": [c for j, c in enumerate(fr.columns) if fr.missing[0, j]],
    }, indent=2))
    return 0


def _freshness(args: argparse.Namespace) -> int:
    from features.lookup import freshness

    ws = open_workspace(args.events)
    now = args.now if args.now is not None else int(time.time() * 1000)
    with _store(args.store, args.namespace) as store:
        reps = freshness(store, ws.sets, now)
    for r in reps:
        print(f"{r.feature_set:<16} {r.version}  records={r.entities:<7} expired={r.expired:<6} staleness p50={r.staleness_p50_ms / 1000:.0f} s p95={r.staleness_p95_ms / 1000:.0f} s max={r.staleness_max_ms / 1000:.0f} s")
    print(json.dumps([r.__dict__ for r in reps]))
    return 0


def _delete_user(args: argparse.Namespace) -> int:
    from features.deletion import delete_user

    ws = open_workspace(args.events)
    with _store(args.store, args.namespace) as store:
        d = delete_user(args.user, log=ws.log, store=store, sets=ws.sets, offline=ws.offline, reason=args.reason)
    print(json.dumps(d.__dict__))
    return 0


def _retire(args: argparse.Namespace) -> int:
    from features.deletion import retire_feature_set

    ws = open_workspace(args.events)
    fs = ws.feature_set(args.name)
    with _store(args.store, args.namespace) as store:
        n = retire_feature_set(fs, store, ws.offline)
    print(f"retired {fs.name} {fs.version}: {n} online keys deleted; materialisation will skip it")
    return 0


def _cadence(args: argparse.Namespace) -> int:
    """--due / --every: the materialized sets, each at its cadence (features/cadence.py). Markers
    are not written (mark window 0): a cadence run must not mark other sets' events as applied."""
    import signal
    import threading

    from features.cadence import run_every, tick
    from features.materialize import materialize

    ws = open_workspace(args.events)
    engine = engine_from_args(args, "parity features materialize")

    def report(r) -> None:
        print(json.dumps({"until_ts": r.until_ts, "ran": list(r.ran), "claimed_elsewhere": list(r.skipped),
                          "seconds": round((r.finished_ms - r.started_ms) / 1000.0, 3)}), flush=True)

    with engine, _store(args.store, args.namespace) as store:
        def run(sets, until):
            return materialize(ws.log, store, sets, until_ts=until, mark_window_ms=0, engine=engine)

        if args.due:
            runs = tick(store, ws.sets, run)
            for r in runs:
                report(r)
            if not runs:
                print(json.dumps({"ran": [], "why": "no materialized set is due"}))
            return 0
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        n = run_every(store, ws.sets, run, stop=stop, on_run=report)  # the modes are re-read from the store each step
    print(json.dumps({"runs": n}))
    return 0


def _mode(args: argparse.Namespace) -> int:
    from features.materialize import switch_mode
    from features.modes import load_modes, parse_overrides

    ws = open_workspace(args.events)
    by_name = {fs.name: fs for fs in ws.sets}
    try:
        assign = parse_overrides(args.assign, by_name) if args.assign else {}
    except ValueError as exc:
        raise SystemExit(f"parity features mode: error: {exc}") from None
    with _store(args.store, args.namespace) as store:
        for name, mode in assign.items():
            print(f"{name}: {switch_mode(ws.log, store, by_name[name], mode)}")
        plan = load_modes(store, ws.sets)
    print(json.dumps({fs.name: plan.of(fs.name).spec for fs in ws.sets}))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from features.durations import format_duration_ms
    from features.freshness_plan import CADENCES_MS, SetLoad, as_json, load_tolerance, load_trade, plan_modes

    ws = open_workspace(args.events)
    for opt, path in (("--trade", args.trade), ("--backtest", args.backtest)):
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"parity features plan: error: {opt}: no such file {path}")
    try:
        costs = load_trade(json.loads(Path(args.trade).read_text()))
        tolerance = load_tolerance(json.loads(Path(args.backtest).read_text())) if args.backtest else {}
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"parity features plan: error: cannot read {args.trade} / {args.backtest}: {exc!r}") from None
    events = ws.log.read()
    span_s = max((int(events.ts.max()) - int(events.ts.min())) / 1000.0, 1.0) if len(events) else 1.0
    loads = {}
    for fs in ws.sets:
        m = fs.event_mask(events)
        codes, ts = fs.entity.codes(events)[0][m], events.ts[m]
        per = {}
        for c in CADENCES_MS:
            win = ts // c
            pairs = np.unique(np.stack([win, codes]), axis=1) if len(ts) else np.empty((2, 0))
            per[c] = float(pairs.shape[1]) / max(len(np.unique(win)), 1)  # distinct entities per window that had events
        tol = tolerance.get(fs.name, (0.0, 0.0))
        loads[fs.name] = SetLoad(float(m.sum()) / span_s, per, tol[0], tol[1])
    choices = plan_modes(costs, loads, qps=args.qps, latency_budget_ms=args.latency_budget_ms)
    print(f"{'feature set':<16} {'mode':<22} {'CPU-s/s':>9} {'p99 added':>10} {'bytes/entity':>13}  why")
    for c in choices:
        spec = c.mode if c.every_ms is None else f"{c.mode}:{format_duration_ms(c.every_ms)}"
        print(f"{c.feature_set:<16} {spec:<22} {c.cpu_s_per_s:>9.4g} {c.read_p99_added_ms:>8.2f}ms {c.bytes_per_entity:>13.0f}  {c.why}")
        for mode, why in sorted(c.rejected.items()):
            print(f"{'':<16}   not {mode}: {why}")
    print(as_json(choices))
    return 0
