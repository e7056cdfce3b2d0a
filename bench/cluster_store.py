"""The online store on one Redis node against a Redis Cluster of 3 masters + 3 replicas, one run.

    python -m bench.cluster_store --out bench/results/cluster_store.json [--rounds 3] [--events 10000]

Run from the repo root. Both are private servers on this machine (tests/redis_server.py, never
127.0.0.1:6379), so the cluster's gain in capacity (three processes, three cores) cannot show
on a 2-core box shared with other work: what this measures is the price per operation of the
cluster's layout and commit (client-side routing, one Lua script per slot group) on the same
hardware, which is what a deployment pays before it gains from more machines.

- reads: the server's request read, `get_groups` of 1 user + 500 items (served-values records),
  one round trip per node; `reads` per round, p50 and p99 in ms;
- ingest: StreamingIngestor over the simulated log in 1000-event batches (4 feature sets:
  user, item, user-topic, user-creator), events/s; on the cluster also with `wait_replicas=1`
  (every commit WAITs for its replica: what surviving a master's kill -9 costs).
Variants run in rounds, the single node first in each, on fresh namespaces; ratios are
cluster / single node within a round, reported with their spread over rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import machine, write_json
from features.eventlog import EventLog
from features.events import MS_PER_DAY
from features.online.base import KeyGroup
from features.online.redis_store import RedisStore
from features.repo import feature_sets
from features.served_values import VALUES_SUFFIX
from features.simulator import simulate
from features.streaming import StreamingIngestor
from tests.redis_server import RedisClusterServers, RedisServer

__all__ = ["run", "main"]

BATCH = 1000
READ_ITEMS = 500


def _ingest(store: RedisStore, sets, events) -> float:
    ing = StreamingIngestor(store, sets, allowed_lateness_ms=30 * MS_PER_DAY, dedupe_ttl_ms=60 * MS_PER_DAY)
    t = time.perf_counter()
    for a in range(0, len(events), BATCH):
        ing.ingest(events.take(np.arange(a, min(a + BATCH, len(events)))))
    return len(events) / (time.perf_counter() - t)


def _reads(store: RedisStore, sets, users: np.ndarray, items: np.ndarray, n: int, rng: np.random.Generator) -> list[float]:
    user_fs, item_fs = sets[0], sets[1]
    out = []
    for _ in range(n + 10):
        u = str(int(rng.choice(users)))
        picked = [str(i) for i in rng.choice(items, size=READ_ITEMS, replace=len(items) < READ_ITEMS)]
        groups = [KeyGroup(user_fs.name, user_fs.version + VALUES_SUFFIX, user_fs.entity.name, [u]),
                  KeyGroup(item_fs.name, item_fs.version + VALUES_SUFFIX, item_fs.entity.name, picked)]
        t = time.perf_counter()
        raw = store.get_groups(groups)
        out.append(time.perf_counter() - t)
        if raw[0] is None or sum(r is not None for r in raw) < READ_ITEMS // 2:
            raise RuntimeError("the read found too few records: the ingest did not write what the read asks for")
    return out[10:]  # the first reads open connections


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q))


def run(out: Path, rounds: int, n_events: int, reads: int, seed: int = 1) -> dict:
    sets = feature_sets("simulated", 20)
    with tempfile.TemporaryDirectory(prefix="parity-cluster-bench-") as tmp:
        data = Path(tmp) / "data"
        simulate(data, users=2000, items=500, days=14, seed=seed)
        events = EventLog(data / "events").read()
    events = events.take(np.arange(min(n_events, len(events))))
    users, items = np.unique(events.user_id), np.unique(events.item_id)
    rows: list[dict] = []
    with RedisServer() as single, RedisClusterServers() as cluster:
        variants = [("single", single.url, 0), ("cluster", cluster.url, 0), ("cluster_wait1", cluster.url, 1)]
        for r in range(rounds):
            row: dict = {"round": r}
            for name, url, wait in variants:
                store = RedisStore(url, namespace=f"b{r}{name.replace('_', '')}", socket_timeout_s=10.0, wait_replicas=wait)
                try:
                    eps = _ingest(store, sets, events)
                    lat = _reads(store, sets, users, items, reads, np.random.default_rng(seed + r))
                finally:
                    store.clear_namespace()
                    store.close()
                row[name] = {"ingest_events_per_s": round(eps, 1), "read_p50_ms": round(_pct(lat, 50), 3), "read_p99_ms": round(_pct(lat, 99), 3)}
                print(f"round {r} {name}: ingest {eps:,.0f} events/s, read p50 {_pct(lat, 50):.2f} ms p99 {_pct(lat, 99):.2f} ms", file=sys.stderr)
            for name in ("cluster", "cluster_wait1"):
                row[name]["ingest_ratio_vs_single"] = round(row[name]["ingest_events_per_s"] / row["single"]["ingest_events_per_s"], 3)
                row[name]["read_p50_ratio_vs_single"] = round(row[name]["read_p50_ms"] / row["single"]["read_p50_ms"], 3)
            rows.append(row)

    def spread(name: str, field: str) -> dict:
        xs = [row[name][field] for row in rows]
        return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}

    summary = {name: {f: spread(name, f) for f in rows[0][name]} for name in ("single", "cluster", "cluster_wait1")}
    result = {
        "benchmark": "cluster_store",
        "command": f"python -m bench.cluster_store --out {out} --rounds {rounds} --events {n_events} --reads {reads}",
        "machine": machine(),
        "setup": {"events": len(events), "batch": BATCH, "read": f"get_groups of 1 user + {READ_ITEMS} items (served-values records)",
                  "reads_per_round": reads, "feature_sets": [fs.name for fs in sets], "simulate_seed": seed,
                  "cluster": "3 masters + 3 replicas, private redis-server processes on this machine",
                  "single": "one private redis-server on this machine"},
        "rounds": rows,
        "summary": summary,
    }
    write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/cluster_store.json"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--reads", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    run(a.out, a.rounds, a.events, a.reads, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
