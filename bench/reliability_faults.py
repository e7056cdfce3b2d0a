"""Reliability under faults: what goes wrong, measured, when Redis, the server or a consumer fails.

    python -m bench.reliability_faults --out bench/results/reliability_faults.json [--quick] [--only NAME,...]

Each scenario starts its own private redis-server (tests/redis_server.py, never 127.0.0.1:6379)
and its own `parity serve` child process on it (`--store redis://...`, `--ingest-token`,
`--admin-token`), over one data dir and one tiny release made once per run in a temporary
folder (`parity data simulate --users 2000 --items 500 --days 14 --seed 0`, `parity train
--profile tiny --seed 0`). Unless the fault makes it pointless, a steady open-loop Recommend
load (~100 req/s; `Load`, a child process: latencies from each request's intended send time,
every answer's status code and `degraded` flag kept) runs while the fault happens.

One JSON file: `{"started_at", "machine", "config", "rows": [...], "total_s"}`, one row per scenario, each
exactly `{fault, scenario, requests, requests_failed, requests_degraded, events_sent,
events_lost, events_double_counted, seconds, notes}`. "failed" is any answer whose status is
not OK (for sigterm_under_load: any but OK, UNAVAILABLE, RESOURCE_EXHAUSTED, CANCELLED, the
answers a client retries); "degraded" an OK answer with `degraded` set. The load client never
retries, so every answer is counted as the server gave it (the typed client, server/client.py,
would retry RESOURCE_EXHAUSTED, CANCELLED and UNAVAILABLE). A column that does not apply is 0
and the notes say so; the notes also say what `seconds` measures in that row: for the Redis
faults, from the fault to the last failed or degraded answer (recovery is confirmed by a probe,
~15 Recommend/s of fresh users, that needs 10 clean answers in a row). Each row's notes end with
the CPU other processes used meanwhile (`OtherLoad`): the machine is shared, and a figure taken
while someone else's job ran is marked BUSY.

Scenarios (`SCENARIOS`, in this order):
  redis_down                  redis-server shut down for 3 s mid-load, started again with its data (BGSAVE beforehand, an RDB)
  redis_paused                CLIENT PAUSE 1500 ALL mid-load
  redis_restarted_empty       restart_empty() mid-load: the server's store watch notices, answers degraded, refills
  server_kill9_during_ingest  30,000 live events over IngestEvents in batches of 500; SIGKILL halfway; restart; resend all
  consumer_kill9              30,000 such events on a Redis Stream; `parity features stream` SIGKILLed halfway, restarted
  poison_messages             1,000 malformed or out-of-range messages among 10,000 valid ones on the stream
  ingest_while_serving        100,000 events over 4 IngestEvents streams while Recommend runs at 40 req/s
  idle_stream_flood           500 idle IngestEvents streams (10 channels, half with the token) under 100 req/s
  sigterm_under_load          SIGTERM while Recommend is offered at 600 req/s (about 2x capacity)

Lost and double-counted events (the estimator). Live events are generated inside the last 50
minutes of the data clock (the server's "now" starts at the log's end), within the admission
rules and the per-user contribution caps, with distinct event ids. The reference is an
in-process MemoryStore that materialises the same event log as the server did and then applies
each distinct event exactly once (as tests/server/test_kill_and_resend.py does). For every user
an event touched, both stores are read as of (newest live event + 1 ms), and for each event type
we take the ONE count feature of `user_activity` whose window holds every live event: the 7-day
counts `impressions_7d`, `plays_7d`, `likes_7d`, `skips_7d` (the 1 h and 1 d counts hold a subset
of the same events; summing them as well would count one lost event up to three times). Each
event adds exactly 1 to its user's 7-day count of its type, so per (user, type)

    d = reference count - store count = (events missing) - (events applied more than once)

  events_lost            = sum over (user, type) of max(d, 0)
  events_double_counted  = sum over (user, type) of max(-d, 0)

This is exact whenever, for each (user, type), the errors go one way only; a loss and a double
count of the same user and type in one run would cancel (the sums are then lower bounds). As a
cross-check with no such blind spot, the notes also give how many feature values of every
feature set (sums, means, decayed sums, topic vectors, item and pair sets) differ between the
two stores for every entity the events touched (`values_mismatched`, 0 when all agree).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from bench.report import machine, write_json

if TYPE_CHECKING:
    from features.events import EventBatch

__all__ = ["FaultsConfig", "Row", "Workspace", "Load", "LoadRecords", "EffectCheck", "prepare", "live_events", "check_effects",
           "lost_and_double", "SCENARIOS", "run", "main"]

REPO = Path(__file__).resolve().parents[1]
INGEST_TOKEN = "faults-ingest-token"
ADMIN_TOKEN = "faults-admin-token"
NAMESPACE = "faults"
EVENT_ID_BASE = 7_000_000_000  # above every id the simulator writes
COUNT_COLUMNS = ("impressions_7d", "plays_7d", "likes_7d", "skips_7d")  # one per event type, each holding every live event
RETRYABLE = frozenset({"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"})  # sigterm_under_load: not failures


# -- configuration and the row -----------------------------------------------------------------
@dataclass(frozen=True)
class FaultsConfig:
    sim: dict = field(default_factory=lambda: {"users": 2000, "items": 500, "days": 14, "seed": 0})
    profile: str = "tiny"
    qps: float = 100.0  # background Recommend load
    timeout_s: float = 1.0  # deadline of each Recommend
    before_s: float = 5.0  # load before the fault
    after_s: float = 3.0  # load after recovery was seen
    recover_timeout_s: float = 90.0  # the longest we wait for clean answers after a fault
    redis_down_s: float = 3.0
    pause_ms: int = 1500
    live_users: int = 5000  # live events' users: 0..live_users-1 (the first 2,000 are known, the rest new)
    kill_events: int = 30_000
    ingest_batch: int = 500
    stream_events: int = 30_000
    poison_good: int = 10_000
    poison_bad: int = 1_000
    consumer_idle_exit_s: float = 4.0
    serving_ingest_events: int = 100_000
    serving_ingest_qps: float = 40.0
    serving_ingest_streams: int = 4  # the server allows 4 open streams per client address
    serving_ingest_stream_events: int = 5_000  # events per IngestEvents stream
    serving_ingest_before_s: float = 10.0
    flood_streams: int = 500
    flood_channels: int = 10
    flood_s: float = 15.0  # longer than the server's 10 s ingest idle timeout
    flood_ramp_s: float = 2.5  # the streams are opened over this long (a burst is mostly shed by gRPC's core as CANCELLED)
    sigterm_qps: float = 600.0
    sigterm_after_s: float = 3.0  # load before SIGTERM
    sigterm_tail_s: float = 2.0  # load after the server exited
    seed: int = 0

    @classmethod
    def quick(cls) -> "FaultsConfig":
        """Every scenario, smaller and shorter (a smoke run; figures not for a report)."""
        return cls(before_s=3.0, after_s=1.5, kill_events=3000, stream_events=3000, poison_good=2000, poison_bad=200,
                   consumer_idle_exit_s=3.0, serving_ingest_events=20_000, serving_ingest_stream_events=2500, serving_ingest_before_s=4.0,
                   flood_streams=200, flood_s=5.0, flood_ramp_s=1.0, sigterm_after_s=2.0, sigterm_tail_s=1.0)


@dataclass(frozen=True)
class Row:
    fault: str
    scenario: str  # one line: what was done
    requests: int
    requests_failed: int
    requests_degraded: int
    events_sent: int
    events_lost: int
    events_double_counted: int
    seconds: float
    notes: str
    facts: dict = field(default_factory=dict, compare=False)  # machine-checkable outcomes for tests; not in the JSON

    def to_json(self) -> dict:
        """The row as written: exactly the ten columns."""
        d = asdict(self)
        d.pop("facts")
        return d

    def line(self) -> str:
        return (f"{self.fault:<27} requests {self.requests:>6} failed {self.requests_failed:>5} degraded {self.requests_degraded:>5} | "
                f"events {self.events_sent:>6} lost {self.events_lost:>4} double {self.events_double_counted:>4} | {self.seconds:7.2f} s | {self.notes}")


@dataclass(frozen=True)
class Workspace:
    data: Path  # a Parity data dir (dataset.json, items.parquet, events/)
    release: Path  # a release folder trained on it
    scratch: Path  # where servers, redis data and consumers keep their logs

    @property
    def now_ms(self) -> int:
        """Where the server's data clock starts: the log's end (dataset.json's end_ts)."""
        from features.datasets import load_info

        return int(load_info(self.data).end_ts)


def _say(msg: str) -> None:
    print(f"[faults] {msg}", file=sys.stderr, flush=True)


def prepare(work: Path, cfg: FaultsConfig) -> Workspace:
    """Simulate the data and train the release with the CLI, as an operator would."""
    data, rel = work / "data", work / "releases"
    sim = cfg.sim
    subprocess.run([sys.executable, "-m", "parity", "data", "simulate", "--out", str(data), "--users", str(sim["users"]), "--items", str(sim["items"]),
                    "--days", str(sim["days"]), "--seed", str(sim["seed"])], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run([sys.executable, "-m", "parity", "train", "--events", str(data), "--out", str(rel), "--profile", cfg.profile,
                          "--seed", str(cfg.seed)], cwd=REPO, check=True, capture_output=True, text=True)
    release = Path(out.stdout.strip().splitlines()[-1])
    scratch = work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    return Workspace(data, release, scratch)


# -- a private redis-server that can also come back with its data --------------------------------
class FaultyRedis:
    """tests.redis_server.RedisServer plus `restart_keep_data` (stop, stay down, start on the same
    port from an RDB file in a folder of ours) and `pause` (CLIENT PAUSE ... ALL)."""

    def __init__(self, data_dir: Path) -> None:
        from tests.redis_server import RedisServer  # the tests' private-server helper (run from the repo root, as bench/conftest.py)

        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        # Later command-line options win: the RDB lives in our folder, which RedisServer.stop() leaves alone.
        self.server = RedisServer(extra_args=["--dir", str(data_dir), "--dbfilename", "dump.rdb"])

    @property
    def url(self) -> str:
        return self.server.url

    def _client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.server.port, socket_timeout=5)

    def dbsize(self) -> int:
        c = self._client()
        try:
            return int(c.dbsize())
        finally:
            c.close()

    def save(self) -> float:
        """BGSAVE (an RDB file in our folder, written by a forked child: SAVE would block Redis for
        tens of ms, a stall of its own) and wait until it is written; returns the seconds it took."""
        c = self._client()
        try:
            t = time.monotonic()
            before = c.lastsave()
            c.bgsave()
            while c.lastsave() == before or c.info("persistence")["rdb_bgsave_in_progress"]:
                if time.monotonic() - t > 60:
                    raise RuntimeError("BGSAVE did not finish within 60 s")
                time.sleep(0.02)
            if c.info("persistence")["rdb_last_bgsave_status"] != "ok":
                raise RuntimeError("BGSAVE failed")
            return time.monotonic() - t
        finally:
            c.close()

    def restart_keep_data(self, down_s: float) -> float:
        """Shut down, stay down `down_s`, start again on the same port; it loads what the last
        `save()` wrote. Returns the seconds the server was unreachable."""
        port = self.server.port
        t0 = time.monotonic()
        self.server.stop()
        time.sleep(down_s)
        self.server._keep_port = port  # RedisServer's own mechanism for restart_empty()
        try:
            self.server.start()
        finally:
            self.server._keep_port = None
        return time.monotonic() - t0

    def restart_empty(self) -> None:
        (self.data_dir / "dump.rdb").unlink(missing_ok=True)  # nothing to load: empty, as a Redis without persistence
        self.server.restart_empty()

    def pause(self, ms: int) -> None:
        c = self._client()
        try:
            c.execute_command("CLIENT", "PAUSE", int(ms), "ALL")
        finally:
            c.close()

    def __enter__(self) -> "FaultyRedis":
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()


# -- the server ----------------------------------------------------------------------------------
def serve_argv(ws: Workspace, store_url: str) -> list[str]:
    return [sys.executable, "-m", "parity", "serve", "--release", str(ws.release), "--events", str(ws.data), "--store", store_url,
            "--namespace", NAMESPACE, "--ingest-token", INGEST_TOKEN, "--admin-token", ADMIN_TOKEN, *EXTRA_SERVER_ARGS]


EXTRA_SERVER_ARGS: list[str] = [a for a in os.environ.get("PARITY_FAULTS_SERVER_ARGS", "").split() if a]  # settings under study


def start_server(ws: Workspace, store_url: str, name: str):
    from bench.serving import ServerProcess

    return ServerProcess(serve_argv(ws, store_url), ws.scratch / f"server-{name}.log").start(timeout_s=120)


def _user_ids(ws: Workspace, n: int, seed: int) -> list[str]:
    from bench.latency import UserMix

    return UserMix.from_data_dir(ws.data).sample(n, seed=seed)


def wait_clean(target: str, user_ids: Sequence[str], timeout_s: float, need: int = 10) -> float | None:
    """Probe Recommend (fresh users, so no cached answer) until `need` answers in a row are OK and
    not degraded; the monotonic time of the first of them, or None on timeout."""
    from server.client import ParityClient, ParityRpcError

    deadline = time.monotonic() + timeout_s
    run_start, run, i = None, 0, 0
    with ParityClient(target, timeout_s=1.0, retries=0) as c:
        while time.monotonic() < deadline:
            t = time.monotonic()
            try:
                ok = not c.recommend(user_ids[i % len(user_ids)]).degraded
            except ParityRpcError:
                ok = False
            i += 1
            if ok:
                run_start = t if run == 0 else run_start
                run += 1
                if run >= need:
                    return run_start
            else:
                run = 0
            time.sleep(0.05)
    return None


# -- the background load (an open-loop generator in a child process) -----------------------------
@dataclass(frozen=True)
class LoadRecords:
    """One entry per request due: its due time (time.monotonic(), shared by every process on the
    machine), latency from the due time (NaN unless OK), status code name, degraded flag."""

    due: np.ndarray
    latency_ms: np.ndarray
    code: np.ndarray  # str
    degraded: np.ndarray  # bool
    send_lag_max_ms: float = 0.0
    first_details: dict = field(default_factory=dict)  # status code -> the server's message of its first occurrence

    @classmethod
    def empty(cls) -> "LoadRecords":
        return cls(np.empty(0), np.empty(0), np.empty(0, dtype=object), np.empty(0, dtype=bool))

    def __len__(self) -> int:
        return len(self.due)

    def window(self, t0: float = -math.inf, t1: float = math.inf) -> "LoadRecords":
        m = (self.due >= t0) & (self.due < t1)
        return LoadRecords(self.due[m], self.latency_ms[m], self.code[m], self.degraded[m], self.send_lag_max_ms, self.first_details)

    @property
    def ok(self) -> np.ndarray:
        return self.code == "OK"

    @property
    def failed(self) -> int:
        return int((~self.ok).sum())

    @property
    def n_degraded(self) -> int:
        return int((self.ok & self.degraded).sum())

    def codes(self) -> dict[str, int]:
        names, counts = np.unique(self.code.astype(str), return_counts=True) if len(self) else ([], [])
        return {str(n): int(c) for n, c in zip(names, counts)}

    def p99(self) -> float | None:
        lat = self.latency_ms[self.ok]
        return round(float(np.percentile(lat, 99)), 1) if len(lat) else None

    def last_bad(self) -> float | None:
        """Due time of the last answer that failed or was degraded."""
        bad = ~self.ok | self.degraded
        return float(self.due[bad].max()) if bad.any() else None


def _load_child(conn, target: str, qps: float, user_ids: list[str], k: int, timeout_s: float, stop, ready, max_s: float) -> None:
    """The load generator's process: request i is due at t0 + i/qps until `stop` is set."""
    import grpc

    from parity_api.v1 import recommender_pb2 as pb
    from parity_api.v1 import recommender_pb2_grpc as pb_grpc

    async def main() -> dict:
        reqs = [pb.RecommendRequest(user_id=u, k=k) for u in user_ids]
        n = len(reqs)
        due: list[float] = []
        out: dict[int, tuple] = {}
        first_details: dict[str, str] = {}
        lag_max = 0.0
        async with grpc.aio.insecure_channel(target) as ch:
            await asyncio.wait_for(ch.channel_ready(), 15)
            stub = pb_grpc.RecommenderStub(ch)
            for i in range(10):  # warm the channel; not recorded
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Recommend(reqs[i % n], timeout=5)
            ready.set()
            in_flight = 0

            async def one(i: int, d: float) -> None:
                nonlocal in_flight
                try:
                    r = await stub.Recommend(reqs[i % n], timeout=timeout_s)
                    out[i] = ((time.monotonic() - d) * 1000.0, "OK", bool(r.degraded))
                except grpc.aio.AioRpcError as exc:
                    out[i] = (math.nan, exc.code().name, False)
                    first_details.setdefault(exc.code().name, (exc.details() or "")[:160])
                except Exception as exc:  # noqa: BLE001 - a client-side failure is still an answer that was not OK
                    out[i] = (math.nan, type(exc).__name__, False)
                finally:
                    in_flight -= 1

            tasks = []
            t0 = time.monotonic() + 0.01
            i = 0
            while not stop.is_set() and i < qps * max_s:
                d = t0 + i / qps
                wait = d - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                lag_max = max(lag_max, time.monotonic() - d)
                due.append(d)
                if in_flight >= 2000:
                    out[i] = (math.nan, "CLIENT_CONCURRENCY_CAP", False)
                else:
                    in_flight += 1
                    tasks.append(asyncio.ensure_future(one(i, d)))
                i += 1
            if tasks:
                await asyncio.wait(tasks, timeout=timeout_s + 5)
        rows = [out.get(j, (math.nan, "NO_ANSWER", False)) for j in range(len(due))]
        return {"due": due, "latency_ms": [r[0] for r in rows], "code": [r[1] for r in rows], "degraded": [r[2] for r in rows],
                "lag_max_ms": lag_max * 1000.0, "first_details": first_details}

    try:
        conn.send(asyncio.run(main()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        ready.set()
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


class Load:
    """Open-loop Recommend load at `qps` in a child process (so the bench's own threads, producers
    and floods do not share its interpreter). `with Load(...) as load: ...; rec = load.stop()`.
    qps 0: no load (stop() returns no records)."""

    def __init__(self, target: str, qps: float, user_ids: Sequence[str], *, k: int = 10, timeout_s: float = 1.0, max_s: float = 900.0) -> None:
        self.target, self.qps, self.user_ids, self.k, self.timeout_s, self.max_s = target, qps, list(user_ids), k, timeout_s, max_s
        self._proc = None
        self.records: LoadRecords | None = None

    def start(self) -> "Load":
        if self.qps <= 0:
            return self
        ctx = mp.get_context("spawn")
        self._stop, ready = ctx.Event(), ctx.Event()
        self._conn, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_load_child, args=(child, self.target, self.qps, self.user_ids, self.k, self.timeout_s, self._stop, ready, self.max_s),
                                 daemon=True)
        self._proc.start()
        child.close()
        if not ready.wait(60):
            self._proc.kill()
            raise RuntimeError(f"the load generator did not connect to {self.target} within 60 s")
        if self._conn.poll(0):  # it reported before starting: an error
            d = self._conn.recv()
            self._proc.join(10)
            raise RuntimeError(f"the load generator failed: {d.get('error', d)}")
        return self

    def stop(self) -> LoadRecords:
        if self.records is not None:
            return self.records
        if self._proc is None:
            self.records = LoadRecords.empty()
            return self.records
        self._stop.set()
        if not self._conn.poll(self.timeout_s + 30):
            self._proc.kill()
            raise RuntimeError("the load generator did not report")
        d = self._conn.recv()
        self._proc.join(10)
        if "error" in d:
            raise RuntimeError(f"the load generator failed: {d['error']}")
        self.records = LoadRecords(np.asarray(d["due"], dtype=float), np.asarray(d["latency_ms"], dtype=float), np.asarray(d["code"], dtype=object),
                                   np.asarray(d["degraded"], dtype=bool), float(d["lag_max_ms"]), d["first_details"])
        return self.records

    def __enter__(self) -> "Load":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self.records is None:
            with contextlib.suppress(Exception):
                self.stop()
            if self._proc.is_alive():
                self._proc.kill()


# -- live events and their reference -------------------------------------------------------------
def live_events(ws: Workspace, n: int, *, seed: int, users: int, id_base: int = EVENT_ID_BASE) -> list:
    """`n` plausible live events (LiveEvent) of the last 50 minutes of the data clock, distinct ids:
    impressions, plays (no longer than the item) and likes of catalogue items by users
    0..users-1, within the contribution caps (a few events per user and hour)."""
    from features.catalog import ItemCatalog
    from features.datasets import read_items
    from server.client import LiveEvent

    rng = np.random.default_rng(seed)
    cat = ItemCatalog.from_table(read_items(ws.data))
    now = ws.now_ms
    rows = rng.integers(len(cat), size=n)
    kinds = rng.integers(3, size=n)
    ts = now - 50 * 60_000 + rng.integers(50 * 60_000, size=n)
    user = rng.integers(users, size=n)
    u = rng.uniform(size=n)
    out = []
    for i in range(n):
        row, kind = int(rows[i]), ("impression", "play", "like")[int(kinds[i])]
        value = round(1.0 + float(u[i]) * (float(cat.duration_s[row]) - 1.0), 1) if kind == "play" else 1.0
        out.append(LiveEvent(id_base + i, int(ts[i]), int(user[i]), int(cat.item_id[row]), kind, value))
    return out


def event_batch(ws: Workspace, events: Sequence) -> EventBatch:
    """LiveEvents as an EventBatch, creator and topic from the catalogue (as the server fills them)."""
    from features.catalog import ItemCatalog
    from features.datasets import read_items
    from features.events import EventBatch, EventType

    cat = ItemCatalog.from_table(read_items(ws.data))
    items = np.asarray([int(e.item_id) for e in events], dtype=np.int64)
    rows = cat.index(items)
    return EventBatch(event_id=np.asarray([int(e.event_id) for e in events], dtype=np.int64), ts=np.asarray([e.ts_ms for e in events], dtype=np.int64),
                      user_id=np.asarray([int(e.user_id) for e in events], dtype=np.int64), item_id=items, creator_id=cat.creator_id[rows],
                      topic=cat.topic[rows], session_id=np.full(len(events), -1, dtype=np.int64),
                      type=np.asarray([int(EventType.parse(e.type)) for e in events], dtype=np.int8),
                      value=np.asarray([float(e.value) for e in events], dtype=np.float64))


def lost_and_double(ref_counts: np.ndarray, store_counts: np.ndarray) -> tuple[int, int]:
    """(events lost, events double counted) from per-(entity, type) counts (see the module docstring)."""
    d = np.rint(np.asarray(ref_counts, dtype=float) - np.asarray(store_counts, dtype=float)).astype(np.int64)
    return int(np.clip(d, 0, None).sum()), int(np.clip(-d, 0, None).sum())


@dataclass(frozen=True)
class EffectCheck:
    users: int  # users the events touched
    lost: int
    double_counted: int
    values_compared: int  # every feature value of every set, for every entity the events touched
    values_mismatched: int

    def note(self) -> str:
        return (f"effects checked against an exactly-once reference for {self.users} users: {self.values_mismatched} of "
                f"{self.values_compared} feature values differ (all sets, every touched entity)")


def check_effects(ws: Workspace, store_url: str, events: Sequence, namespace: str = NAMESPACE) -> EffectCheck:
    """Compare the store with the reference: the log materialised, then each distinct event once."""
    from features.datasets import load_info
    from features.eventlog import EventLog
    from features.lookup import FeatureLookup
    from features.materialize import materialize
    from features.online import open_store
    from features.online.memory import MemoryStore
    from features.repo import feature_sets
    from features.streaming import StreamingIngestor

    info = load_info(ws.data)
    sets = feature_sets(info.kind, info.n_topics)
    batch = event_batch(ws, events).deduplicated().sorted()
    ref = MemoryStore("reference")
    log = EventLog(ws.data / "events")
    materialize(log, ref, sets, until_ts=log.max_ts() + 1)
    r = StreamingIngestor(ref, sets, name="reference").ingest(batch)
    if r.accepted != len(batch):
        raise RuntimeError(f"the reference refused {len(batch) - r.accepted} of {len(batch)} live events (late: {r.late}): "
                           "the generated events do not fit the lateness window")
    served = open_store(store_url, namespace=namespace)
    try:
        t_read = int(batch.ts.max()) + 1
        lost = double = compared = mismatched = 0
        users = 0
        for fs in sets:
            codes = np.unique(fs.entity.codes(batch)[0][fs.event_mask(batch)])
            if len(codes) == 0:
                continue
            a = FeatureLookup(served, sets).read(fs.name, codes, t_read).frame
            b = FeatureLookup(ref, sets).read(fs.name, codes, t_read).frame
            same = np.isclose(a.values, b.values, rtol=1e-9, atol=1e-9, equal_nan=True) & (a.missing == b.missing)
            compared += int(same.size)
            mismatched += int((~same).sum())
            if fs.name == "user_activity":
                users = len(codes)
                cols = [a.columns.index(c) for c in COUNT_COLUMNS]
                got = np.where(a.missing[:, cols], 0.0, a.values[:, cols])
                want = np.where(b.missing[:, cols], 0.0, b.values[:, cols])
                lost, double = lost_and_double(want, got)
        return EffectCheck(users, lost, double, compared, mismatched)
    finally:
        served.close()


# -- scenarios -------------------------------------------------------------------------------------
def _span(due: np.ndarray, t0: float) -> str:
    return f"+{due.min() - t0:.2f}..+{due.max() - t0:.2f} s" if len(due) else "none"


def _serving_notes(rec: LoadRecords, qps: float, fault_t: float | None = None) -> str:
    parts = [f"load {qps:g} req/s open loop, codes {rec.codes()}"]
    if rec.first_details:
        parts.append("first message per code: " + ", ".join(f"{c}: {m!r}" for c, m in sorted(rec.first_details.items())))
    if fault_t is not None:
        parts.append(f"p99 before the fault {rec.window(t1=fault_t).p99()} ms, from it on {rec.window(fault_t).p99()} ms; "
                     f"failed answers due at {_span(rec.due[~rec.ok], fault_t)}, degraded at {_span(rec.due[rec.ok & rec.degraded], fault_t)} "
                     "(from the fault)")
    return "; ".join(parts)


def _recovery(rec: LoadRecords, fault_t: float) -> float:
    """Seconds from the fault to the due time of the last failed or degraded answer (0: none)."""
    last = rec.window(fault_t).last_bad()
    return round(max(0.0, last - fault_t), 2) if last is not None else 0.0


def _serving_fault(ws: Workspace, cfg: FaultsConfig, fault: str, scenario: str, inject: Callable[[FaultyRedis], str],
                   setup: Callable[[FaultyRedis], str] | None = None) -> Row:
    """Redis faults under load: `setup` (before the measured fault, 1 s to settle), inject, wait
    for clean answers, count what the clients saw."""
    users = _user_ids(ws, 50_000, cfg.seed)
    probe_users = _user_ids(ws, 5_000, cfg.seed + 1)
    with FaultyRedis(ws.scratch / f"redis-{fault}") as r:
        srv = start_server(ws, r.url, fault)
        try:
            with Load(srv.target, cfg.qps, users, timeout_s=cfg.timeout_s) as load:
                time.sleep(cfg.before_s)
                prep = ""
                if setup is not None:
                    prep = setup(r) + "; "
                    time.sleep(1.0)
                t_fault = time.monotonic()
                what = prep + inject(r)
                clean = wait_clean(srv.target, probe_users, cfg.recover_timeout_s)
                time.sleep(cfg.after_s)
                rec = load.stop()
        finally:
            srv.stop()
    seconds = _recovery(rec, t_fault)
    before = rec.window(t1=t_fault)
    notes = (f"{what}; seconds = from the fault to the last failed or degraded answer; "
             f"{'clean answers again ' + format(clean - t_fault, '.2f') + ' s after the fault' if clean else 'NOT clean within ' + format(cfg.recover_timeout_s, 'g') + ' s'}; "
             f"before the fault: {before.failed} failed, {before.n_degraded} degraded of {len(before)}; "
             f"{_serving_notes(rec, cfg.qps, t_fault)}; no events sent (serving-only fault): event columns 0")
    return Row(fault, scenario, len(rec), rec.failed, rec.n_degraded, 0, 0, 0, seconds, notes,
               {"clean_after_s": None if clean is None else round(clean - t_fault, 2), "codes": rec.codes()})


def redis_down(ws: Workspace, cfg: FaultsConfig) -> Row:
    def setup(r: FaultyRedis) -> str:
        return f"BGSAVE 1 s before the fault (took {r.save() * 1000:.0f} ms; counted in the before-the-fault figures)"

    def inject(r: FaultyRedis) -> str:
        keys = r.dbsize()
        down = r.restart_keep_data(cfg.redis_down_s)
        return (f"redis-server unreachable for {down:.2f} s (SHUTDOWN NOSAVE, {cfg.redis_down_s:g} s down, started again on its port "
                f"from the RDB: {keys} keys before, {r.dbsize()} after)")

    return _serving_fault(ws, cfg, "redis_down", f"redis-server stopped for {cfg.redis_down_s:g} s mid-load ({cfg.qps:g} Recommend/s), "
                          "then started again on the same port with its data", inject, setup)


def redis_paused(ws: Workspace, cfg: FaultsConfig) -> Row:
    def inject(r: FaultyRedis) -> str:
        r.pause(cfg.pause_ms)
        return f"CLIENT PAUSE {cfg.pause_ms} ALL"

    return _serving_fault(ws, cfg, "redis_paused", f"CLIENT PAUSE {cfg.pause_ms} ALL mid-load ({cfg.qps:g} Recommend/s)", inject)


def redis_restarted_empty(ws: Workspace, cfg: FaultsConfig) -> Row:
    def inject(r: FaultyRedis) -> str:
        t = time.monotonic()
        r.restart_empty()
        return f"redis-server restarted empty on its port in {time.monotonic() - t:.2f} s (the server must notice, answer degraded and refill from the event log)"

    return _serving_fault(ws, cfg, "redis_restarted_empty", f"redis-server restarted empty (restart_empty) mid-load ({cfg.qps:g} Recommend/s)", inject)


def _ingest_batches(target: str, batches: Sequence[Sequence], stop: threading.Event | None = None, *, retries: int = 0,
                    timeout_s: float = 30.0, progress: list[int] | None = None) -> tuple[int, np.ndarray, list[str]]:
    """Send each batch as one IngestEvents stream; (batches acknowledged, totals [accepted,
    duplicates, late, invalid, limited], errors). Stops at the first error or when `stop` is set;
    `progress` ([events acknowledged, seconds the last batch took], read by another thread) is kept up to date."""
    from server.client import ParityClient, ParityRpcError

    done, totals, errors = 0, np.zeros(5, dtype=np.int64), []
    t0 = time.monotonic()
    with ParityClient(target, timeout_s=timeout_s, retries=retries, ingest_token=INGEST_TOKEN) as c:
        for b in batches:
            if stop is not None and stop.is_set():
                break
            try:
                r = c.ingest(b, timeout_s=timeout_s)
            except ParityRpcError as exc:
                errors.append(f"{exc.code.name}")
                break
            done += 1
            totals += (r.accepted, r.duplicates, r.late, r.invalid, r.limited)
            if progress is not None:
                now = time.monotonic()
                progress[0] += len(b)
                progress[1] = now - t0  # the last batch's time (an average over the first, slower ones overshot the next batch)
                t0 = now
    return done, totals, errors


def server_kill9_during_ingest(ws: Workspace, cfg: FaultsConfig) -> Row:
    n, size = cfg.kill_events, cfg.ingest_batch
    events = live_events(ws, n, seed=cfg.seed + 4, users=cfg.live_users)
    batches = [events[a : a + size] for a in range(0, n, size)]
    t_start = time.monotonic()
    with FaultyRedis(ws.scratch / "redis-kill9") as r:
        srv = start_server(ws, r.url, "kill9-a")
        result: dict = {}
        stop = threading.Event()
        acked = [0, 0.0]
        producer = threading.Thread(target=lambda: result.update(zip(("done", "totals", "errors"),
                                                                     _ingest_batches(srv.target, batches, stop, progress=acked))))
        try:
            producer.start()
            while producer.is_alive() and acked[0] < n // 2:  # halfway: half the events acknowledged
                time.sleep(0.002)
            # Late into the next batch: the server commits a stream's events once they have arrived,
            # so the kill most likely lands during that commit or just before its acknowledgement.
            time.sleep(0.5 * acked[1])
            proc = srv.proc
            proc.send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            proc.wait(10)
            stop.set()
            producer.join(60)
        finally:
            srv.stop()
        acked_batches, phase1, errors = result.get("done", 0), result.get("totals", np.zeros(5, np.int64)), result.get("errors", [])
        srv2 = start_server(ws, r.url, "kill9-b")  # the same Redis
        down_s = time.monotonic() - t_kill
        try:
            done2, phase2, errors2 = _ingest_batches(srv2.target, batches, retries=3, timeout_s=60.0)
        finally:
            srv2.stop()
        seconds = time.monotonic() - t_start
        chk = check_effects(ws, r.url, events)
    ok_resend = done2 == len(batches) and not errors2
    notes = (f"no background load: the server itself is killed (Recommend columns 0); seconds = whole scenario; "
             f"SIGKILL after {acked_batches} of {len(batches)} batches were acknowledged ({int(phase1[0])} accepted; the producer saw {errors or 'no error'}); "
             f"server down {down_s:.1f} s (kill to SERVING again on the same Redis); resend of all {len(batches)} batches "
             f"{'completed' if ok_resend else 'FAILED ' + str(errors2)}: accepted {int(phase2[0])}, duplicates {int(phase2[1])}, late {int(phase2[2])}, "
             f"invalid {int(phase2[3])}, limited {int(phase2[4])}; accepted before + after the kill = {int(phase1[0] + phase2[0])} of {n} "
             f"(the rest were applied by the killed server without an acknowledgement); {chk.note()}")
    return Row("server_kill9_during_ingest", f"{n} live events over IngestEvents in batches of {size}; SIGKILL the server halfway, restart it on the "
               "same Redis, resend every batch", 0, 0, 0, n, chk.lost, chk.double_counted, round(seconds, 2), notes,
               {"acked_before_kill": acked_batches, "resend_complete": ok_resend, "resend_totals": [int(x) for x in phase2],
                "values_mismatched": chk.values_mismatched})


def _stream_cmd(ws: Workspace, redis_url: str, stream: str, idle_exit_s: float) -> list[str]:
    return [sys.executable, "-m", "parity", "features", "stream", "--redis", redis_url, "--stream", stream, "--events", str(ws.data),
            "--namespace", NAMESPACE, "--idle-exit", str(idle_exit_s)]


def _consumer_stats(log_path: Path) -> dict:
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def _consumer_meta(redis_url: str, stream: str) -> dict:
    """The consumer's ingestor counters, as committed to the store (features.streaming)."""
    from features.online import open_store

    s = open_store(redis_url, namespace=NAMESPACE)
    try:
        raw = s.get_meta(f"stream:stream-{stream}")
        return json.loads(raw) if raw else {}
    finally:
        s.close()


def consumer_kill9(ws: Workspace, cfg: FaultsConfig) -> Row:
    import redis
    from features.redis_stream import publish_events

    n = cfg.stream_events
    events = live_events(ws, n, seed=cfg.seed + 5, users=cfg.live_users)
    stream = "live-events"
    users = _user_ids(ws, 50_000, cfg.seed)
    with FaultyRedis(ws.scratch / "redis-consumer") as r:
        srv = start_server(ws, r.url, "consumer")  # materialises the store the consumer writes into, and serves from it
        try:
            with Load(srv.target, cfg.qps, users, timeout_s=cfg.timeout_s) as load:
                client = redis.Redis.from_url(r.url)
                publish_events(client, stream, event_batch(ws, events))
                t0 = time.monotonic()
                log1 = ws.scratch / "consumer-1.log"
                with open(log1, "wb") as f:
                    p1 = subprocess.Popen(_stream_cmd(ws, r.url, stream, cfg.consumer_idle_exit_s), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
                applied_at_kill = 0
                while p1.poll() is None:
                    applied_at_kill = int(_consumer_meta(r.url, stream).get("accepted", 0))
                    if applied_at_kill >= n // 2:
                        break
                    time.sleep(0.01)
                p1.send_signal(signal.SIGKILL)
                rc1 = p1.wait(10)
                pending = client.xpending(stream, "parity-features")["pending"]
                log2 = ws.scratch / "consumer-2.log"
                with open(log2, "wb") as f:
                    p2 = subprocess.run(_stream_cmd(ws, r.url, stream, cfg.consumer_idle_exit_s), cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=600)
                seconds = time.monotonic() - t0
                st = _consumer_stats(log2)
                client.close()
                rec = load.stop()
        finally:
            srv.stop()
        chk = check_effects(ws, r.url, events)
    notes = (f"SIGKILL (exit {rc1}) when {applied_at_kill} events were committed, {pending} messages pending; restarted consumer exit "
             f"{p2.returncode}: {{messages {st.get('messages')}, accepted {st.get('accepted')}, duplicates {st.get('duplicates')}, late {st.get('late')}, "
             f"dead-lettered {st.get('dead_lettered')}}}; seconds = first consumer start to the second's exit (incl. its {cfg.consumer_idle_exit_s:g} s idle exit); "
             f"{chk.note()}; {_serving_notes(rec, cfg.qps)}")
    return Row("consumer_kill9", f"{n} live events on a Redis Stream consumed by `parity features stream`, SIGKILLed halfway and restarted "
               f"(server under {cfg.qps:g} Recommend/s on the same store)", len(rec), rec.failed, rec.n_degraded, n, chk.lost, chk.double_counted,
               round(seconds, 2), notes, {"consumer_exit": p2.returncode, "killed_at": applied_at_kill, "restart_stats": st,
                                          "values_mismatched": chk.values_mismatched})


def poison_fields(i: int, now_wall_ms: int, good: dict[str, str]) -> tuple[dict, str]:
    """The i-th bad message (a stream entry's fields) and what is wrong with it: built from a
    valid event's fields with one thing broken, cycling through the kinds."""
    f = dict(good)
    kinds: list[tuple[str, Callable[[], None]]] = [
        ("type=300", lambda: f.update(type="300")),
        ("event_id = 2^63", lambda: f.update(event_id=str(1 << 63))),
        ("event_id = 2^64 + 7", lambda: f.update(event_id=str((1 << 64) + 7))),
        ("non-numeric user_id", lambda: f.update(user_id="alice")),
        ("non-numeric ts", lambda: f.update(ts="yesterday")),
        ("non-numeric value", lambda: f.update(value="lots")),
        ("huge value field (100 kB)", lambda: f.update(value="9" * 100_000)),
        ("huge event_id field (20 kB)", lambda: f.update(event_id="1" * 20_000)),
        ("huge type field (1 MB)", lambda: f.update(type="x" * 1_000_000)),
        ("a play of 1e7 s", lambda: f.update(type="play", value="10000000.0")),
        ("a like worth 5", lambda: f.update(type="like", value="5.0")),
        ("value NaN", lambda: f.update(value="nan")),
        ("value inf", lambda: f.update(value="inf")),
        ("negative play", lambda: f.update(type="play", value="-3.0")),
        ("ts a year ahead of the clock", lambda: f.update(ts=str(now_wall_ms + 365 * 86_400_000))),
        ("negative ts", lambda: f.update(ts="-5")),
        ("item_id -5", lambda: f.update(item_id="-5")),
        ("user_id 2^31", lambda: f.update(user_id=str(1 << 31))),
        ("topic 10000", lambda: f.update(topic="10000")),
        ("rating in a dataset without ratings", lambda: f.update(type="rating", value="4.0")),
        ("unknown type name", lambda: f.update(type="purchase")),
        ("missing item_id", lambda: f.pop("item_id")),
        ("only an unknown field", lambda: (f.clear(), f.update(hello="world"))),
        ("non-ASCII bytes in user_id", lambda: f.update(user_id=b"\xff\xfe12")),
        ("user_id with spaces", lambda: f.update(user_id=" 12 ")),
        ("hex value", lambda: f.update(value="0x10")),
    ]
    what, breaks = kinds[i % len(kinds)]
    breaks()
    return f, what


def poison_messages(ws: Workspace, cfg: FaultsConfig) -> Row:
    import redis
    from features.redis_stream import event_fields

    n_good, n_bad = cfg.poison_good, cfg.poison_bad
    events = live_events(ws, n_good, seed=cfg.seed + 6, users=cfg.live_users)
    good_fields = event_fields(event_batch(ws, events))
    every = max(1, (n_good + n_bad) // n_bad)
    stream = "poisoned"
    users = _user_ids(ws, 50_000, cfg.seed)
    wall_ms = int(time.time() * 1000)
    with FaultyRedis(ws.scratch / "redis-poison") as r:
        srv = start_server(ws, r.url, "poison")
        try:
            with Load(srv.target, cfg.qps, users, timeout_s=cfg.timeout_s) as load:
                client = redis.Redis.from_url(r.url)
                bad_ids, kinds = set(), {}
                gi = bi = 0
                pipe = client.pipeline(transaction=False)
                plan = []
                for pos in range(n_good + n_bad):
                    if bi < n_bad and (pos % every == every - 1 or n_good - gi == 0):
                        fields, what = poison_fields(bi, wall_ms, good_fields[bi % n_good])
                        kinds[what] = kinds.get(what, 0) + 1
                        plan.append(True)
                        bi += 1
                    else:
                        fields = good_fields[gi]
                        plan.append(False)
                        gi += 1
                    pipe.xadd(stream, fields)
                ids = pipe.execute()
                bad_ids = {mid for mid, bad in zip(ids, plan) if bad}
                t0 = time.monotonic()
                log = ws.scratch / "consumer-poison.log"
                with open(log, "wb") as f:
                    p = subprocess.run(_stream_cmd(ws, r.url, stream, cfg.consumer_idle_exit_s), cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=600)
                seconds = time.monotonic() - t0
                st = _consumer_stats(log)
                dead = client.xrange(f"{stream}:dead")
                dead_src = {e[1].get(b"source_id") for e in dead}
                pending = client.xpending(stream, "parity-features")["pending"]
                client.close()
                rec = load.stop()
        finally:
            srv.stop()
        chk = check_effects(ws, r.url, events)
    exact = dead_src == bad_ids and len(dead) == n_bad
    reasons = {k: st.get(k) for k in ("malformed", "out_of_range", "implausible", "rate_limited", "poison", "deleted")}
    notes = (f"consumer exit {p.returncode} ({'finished' if p.returncode == 0 else 'CRASHED, see ' + str(log)}); dead-lettered {st.get('dead_lettered')} "
             f"({reasons}), dead-letter stream holds {len(dead)} entries, {'exactly the bad messages' if exact else 'NOT exactly the bad messages'} "
             f"({len(bad_ids - dead_src)} bad ones missing, {len(dead_src - bad_ids)} good ones dead-lettered); accepted {st.get('accepted')} of {n_good} good; "
             f"{pending} left pending; {len(kinds)} kinds of bad message: {kinds}; lost/double counted are over the good events; "
             f"seconds = consumer start to exit (incl. its {cfg.consumer_idle_exit_s:g} s idle exit); {chk.note()}; {_serving_notes(rec, cfg.qps)}")
    return Row("poison_messages", f"{n_bad} malformed or out-of-range messages interleaved with {n_good} valid ones on a Redis Stream, consumed by "
               "`parity features stream`", len(rec), rec.failed, rec.n_degraded, n_good + n_bad, chk.lost, chk.double_counted, round(seconds, 2), notes,
               {"consumer_exit": p.returncode, "dead_lettered": st.get("dead_lettered"), "dead_letters_exact": exact, "pending": pending,
                "accepted": st.get("accepted"), "values_mismatched": chk.values_mismatched})


def ingest_while_serving(ws: Workspace, cfg: FaultsConfig) -> Row:
    n, k = cfg.serving_ingest_events, cfg.serving_ingest_streams
    events = live_events(ws, n, seed=cfg.seed + 7, users=cfg.live_users)
    size = cfg.serving_ingest_stream_events
    streams = [events[a : a + size] for a in range(0, n, size)]
    users = _user_ids(ws, 50_000, cfg.seed)
    with FaultyRedis(ws.scratch / "redis-ingest") as r:
        srv = start_server(ws, r.url, "ingest")
        try:
            with Load(srv.target, cfg.serving_ingest_qps, users, timeout_s=cfg.timeout_s) as load:
                time.sleep(cfg.serving_ingest_before_s)
                results: list = [None] * k
                threads = [threading.Thread(target=lambda j=j: results.__setitem__(j, _ingest_batches(srv.target, streams[j::k], retries=3, timeout_s=120.0)))
                           for j in range(k)]
                t0 = time.monotonic()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                t1 = time.monotonic()
                time.sleep(cfg.after_s)
                rec = load.stop()
        finally:
            srv.stop()
        chk = check_effects(ws, r.url, events)
    totals = sum(res[1] for res in results)
    errors = [e for res in results for e in res[2]]
    before, during, after = rec.window(t1=t0), rec.window(t0, t1), rec.window(t1)
    pct = lambda x, of: f"{100.0 * x / of:.1f} %" if of else "n/a"  # noqa: E731
    notes = (f"{k} concurrent producers, {len(streams)} IngestEvents streams of {size}: accepted {int(totals[0])}, duplicates {int(totals[1])}, "
             f"late {int(totals[2])}, invalid {int(totals[3])}, limited {int(totals[4])}, stream errors {errors or 'none'}; "
             f"ingest took {t1 - t0:.1f} s ({n / (t1 - t0):.0f} events/s; seconds = that); Recommend p99 before {before.p99()} ms, during {during.p99()} ms, "
             f"after {after.p99()} ms; during the ingest {during.failed} failed and {during.n_degraded} degraded of {len(during)} "
             f"({pct(during.n_degraded, len(during))} degraded; the issue measured 11 % before its fix); {chk.note()}; {_serving_notes(rec, cfg.serving_ingest_qps)}")
    return Row("ingest_while_serving", f"{n} live events over {k} concurrent IngestEvents producers while Recommend runs at {cfg.serving_ingest_qps:g} req/s "
               "on the Redis store", len(rec), rec.failed, rec.n_degraded, n, chk.lost, chk.double_counted, round(t1 - t0, 2), notes,
               {"totals": [int(x) for x in totals], "p99_before_ms": before.p99(), "p99_during_ms": during.p99(), "values_mismatched": chk.values_mismatched})


async def _flood(target: str, n: int, channels: int, hold_s: float, ramp_s: float, t_end: list) -> dict[str, int]:
    """`n` IngestEvents streams that never send, opened over `ramp_s` on `channels` channels (even
    ones with the ingest token), all half-closed `hold_s` after the first. Outcome counts by status
    code and token; OK means the stream was still open at the end (the server then answers it)."""
    import grpc

    from parity_api.v1 import recommender_pb2_grpc as pb_grpc

    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    release = asyncio.Event()
    out: dict[str, int] = {}

    async def silent():
        await release.wait()
        return
        yield  # makes this an (empty) async generator

    async def one(j: int) -> None:
        stub = pb_grpc.RecommenderStub(chans[j % channels])
        md = (("authorization", f"Bearer {INGEST_TOKEN}"),) if j % 2 == 0 else ()
        try:
            await stub.IngestEvents(silent(), metadata=md, timeout=hold_s + 60)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        key = f"{code} ({'token' if j % 2 == 0 else 'no token'})"
        out[key] = out.get(key, 0) + 1

    t0 = time.monotonic()
    tasks = []
    for j in range(n):
        tasks.append(asyncio.ensure_future(one(j)))
        await asyncio.sleep(max(0.0, t0 + ramp_s * (j + 1) / n - time.monotonic()))
    await asyncio.sleep(max(0.0, t0 + hold_s - time.monotonic()))
    t_end.append(time.monotonic())
    release.set()
    await asyncio.wait(tasks, timeout=30)
    for c in chans:
        await c.close()
    return dict(sorted(out.items()))


def idle_stream_flood(ws: Workspace, cfg: FaultsConfig) -> Row:
    from server.client import LiveEvent, ParityClient, ParityRpcError

    users = _user_ids(ws, 50_000, cfg.seed)
    health: list[tuple[str, float]] = []
    legit = "not tried"
    with FaultyRedis(ws.scratch / "redis-flood") as r:
        srv = start_server(ws, r.url, "flood")
        try:
            with Load(srv.target, cfg.qps, users, timeout_s=cfg.timeout_s) as load:
                time.sleep(cfg.before_s)
                t_end: list = []
                outcome: dict = {}
                flood = threading.Thread(target=lambda: outcome.update(asyncio.run(
                    _flood(srv.target, cfg.flood_streams, cfg.flood_channels, cfg.flood_s, cfg.flood_ramp_s, t_end))))
                t0 = time.monotonic()
                flood.start()
                time.sleep(min(1.0, cfg.flood_s / 3))
                with ParityClient(srv.target, timeout_s=2.0, retries=0, ingest_token=INGEST_TOKEN) as c:
                    while flood.is_alive() and not t_end:
                        t = time.perf_counter()
                        try:
                            health.append((c.health(), (time.perf_counter() - t) * 1000))
                        except ParityRpcError as exc:
                            health.append((exc.code.name, (time.perf_counter() - t) * 1000))
                        if len(health) == 3:  # a legitimate producer, from the same address, mid-flood
                            try:
                                s = c.ingest([LiveEvent(EVENT_ID_BASE + 999_999_999, ws.now_ms - 60_000, 1, _an_item(ws), "impression")])
                                legit = f"accepted {s.accepted}"
                            except ParityRpcError as exc:
                                legit = f"refused {exc.code.name}: {exc.details[:90]}"
                        time.sleep(0.5)
                flood.join(60)
                t1 = t_end[0] if t_end else time.monotonic()
                time.sleep(cfg.after_s)
                rec = load.stop()
        finally:
            srv.stop()
    during, before = rec.window(t0, t1), rec.window(t1=t0)
    answered = [h for h in health if h[0] == "SERVING"]
    notes = (f"{cfg.flood_streams} streams opened over {cfg.flood_ramp_s:g} s on {cfg.flood_channels} channels, held {cfg.flood_s:g} s (seconds = that), "
             f"outcomes {outcome} (OK: still open at the end; DEADLINE_EXCEEDED: ended by the server's idle timeout); "
             f"health checks during the flood: {len(answered)} of {len(health)} SERVING, slowest {max((h[1] for h in health), default=0):.1f} ms; "
             f"a legitimate 1-event ingest from the same address mid-flood: {legit}; "
             f"Recommend p99 before {before.p99()} ms, during {during.p99()} ms; during: {during.failed} failed, {during.n_degraded} degraded of {len(during)}; "
             f"no events sent (the streams are idle): event columns 0; {_serving_notes(rec, cfg.qps)}")
    return Row("idle_stream_flood", f"{cfg.flood_streams} IngestEvents streams held open without sending ({cfg.flood_channels} channels, half with the token) "
               f"while Recommend runs at {cfg.qps:g} req/s", len(rec), rec.failed, rec.n_degraded, 0, 0, 0, round(t1 - t0, 2), notes,
               {"outcomes": outcome, "health": [h[0] for h in health], "p99_during_ms": during.p99()})


def _an_item(ws: Workspace) -> int:
    from features.catalog import ItemCatalog
    from features.datasets import read_items

    return int(ItemCatalog.from_table(read_items(ws.data)).item_id[0])


def sigterm_under_load(ws: Workspace, cfg: FaultsConfig) -> Row:
    users = _user_ids(ws, 50_000, cfg.seed)
    with FaultyRedis(ws.scratch / "redis-sigterm") as r:
        srv = start_server(ws, r.url, "sigterm")
        proc = srv.proc
        try:
            with Load(srv.target, cfg.sigterm_qps, users, timeout_s=cfg.timeout_s) as load:
                time.sleep(cfg.sigterm_after_s)
                t_term = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                try:
                    rc = proc.wait(60)
                except subprocess.TimeoutExpired:
                    rc = None
                t_exit = time.monotonic()
                time.sleep(cfg.sigterm_tail_s)
                rec = load.stop()
        finally:
            srv.stop()
    codes = rec.codes()
    failed = int(sum(c for k, c in codes.items() if k not in RETRYABLE))
    before, drain, after = rec.window(t1=t_term), rec.window(t_term, t_exit), rec.window(t_exit)
    notes = (f"server exit code {rc if rc is not None else 'NONE (still running after 60 s)'} ({'ok' if rc == 0 else 'NOT 0'}); "
             f"seconds = SIGTERM to exit (drain grace 2 s); codes over the run {codes}; before SIGTERM {before.codes()} (p99 {before.p99()} ms), "
             f"during the drain {drain.codes()}, after exit {after.codes()}; failed = codes other than OK, UNAVAILABLE, RESOURCE_EXHAUSTED, CANCELLED; "
             f"degraded counts OK answers; load generator's worst send lag {rec.send_lag_max_ms:.0f} ms; no events: event columns 0")
    return Row("sigterm_under_load", f"SIGTERM the server after {cfg.sigterm_after_s:g} s of Recommend offered at {cfg.sigterm_qps:g} req/s (about 2x capacity)",
               len(rec), failed, rec.n_degraded, 0, 0, 0, round(t_exit - t_term, 2), notes, {"server_exit": rc, "codes": codes})


SCENARIOS: dict[str, Callable[[Workspace, FaultsConfig], Row]] = {
    "redis_down": redis_down,
    "redis_paused": redis_paused,
    "redis_restarted_empty": redis_restarted_empty,
    "server_kill9_during_ingest": server_kill9_during_ingest,
    "consumer_kill9": consumer_kill9,
    "poison_messages": poison_messages,
    "ingest_while_serving": ingest_while_serving,
    "idle_stream_flood": idle_stream_flood,
    "sigterm_under_load": sigterm_under_load,
}


# -- the run ---------------------------------------------------------------------------------------
class OtherLoad:
    """CPU the rest of the machine used while a scenario ran: all busy CPU time (/proc/stat) minus
    this process's and its waited-for children's (os.times()). Every child of a scenario (servers,
    redis-servers, consumers, the load generator) has been waited for when it ends, so the rest is
    other people's work: figures taken on a busy machine say so in their notes."""

    @staticmethod
    def _busy_s() -> float:
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return math.nan
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _mine_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> "OtherLoad":
        self.t0, self.busy0, self.mine0 = time.monotonic(), self._busy_s(), self._mine_s()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.monotonic() - self.t0
        self.other_s = max(0.0, (self._busy_s() - self.busy0) - (self._mine_s() - self.mine0))

    def note(self) -> str:
        cores = os.cpu_count() or 1
        share = 100.0 * self.other_s / max(self.wall * cores, 1e-9)
        return (f"other processes on the machine used {self.other_s / max(self.wall, 1e-9):.2f} cores ({share:.0f} % of {cores}) "
                f"during this scenario{' (BUSY: figures disturbed)' if share >= 10 else ''}")




def run(out: Path, cfg: FaultsConfig, *, only: Sequence[str] | None = None, work: Path | None = None) -> dict:
    names = list(only) if only else list(SCENARIOS)
    tmp = tempfile.TemporaryDirectory(prefix="faults-run-") if work is None else None
    work = Path(tmp.name) if tmp else Path(work)
    t_run = time.monotonic()
    try:
        result = {"started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  "machine": {**machine(), "loadavg_at_start": os.getloadavg()}, "config": asdict(cfg), "rows": []}
        _say(f"simulating {cfg.sim} and training a {cfg.profile} release in {work}")
        ws = prepare(work, cfg)
        for name in names:
            t = time.monotonic()
            try:
                with OtherLoad() as other:
                    row = SCENARIOS[name](ws, cfg)
                row = replace(row, notes=f"{row.notes}; {other.note()}")
            except Exception as exc:  # noqa: BLE001 - one broken scenario is recorded, the others still run
                _say(f"{name} FAILED: {type(exc).__name__}: {exc}")
                row = Row(name, "the scenario did not complete", 0, 0, 0, 0, 0, 0, round(time.monotonic() - t, 2),
                          f"HARNESS ERROR {type(exc).__name__}: {str(exc)[:500]} (logs under {ws.scratch})", {"error": True})
                result["errors"] = result.get("errors", 0) + 1
            result["rows"].append(row.to_json())
            write_json(out, result)
            print(row.line(), flush=True)
            _say(f"{name} took {time.monotonic() - t:.0f} s")
        result["total_s"] = round(time.monotonic() - t_run, 1)
        write_json(out, result)
        return result
    finally:
        if tmp:
            tmp.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reliability_faults", description="Reliability under faults: one JSON row per scenario.")
    p.add_argument("--out", default="bench/results/reliability_faults.json", help="result JSON (default bench/results/reliability_faults.json)")
    p.add_argument("--quick", action="store_true", help="smaller and shorter scenarios (a smoke run, under 3 minutes)")
    p.add_argument("--only", default=None, help=f"comma-separated scenarios (default all): {','.join(SCENARIOS)}")
    p.add_argument("--work", default=None, help="keep the data, release and logs here (default: a temporary dir)")
    a = p.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()] if a.only else None
    bad = [s for s in only or () if s not in SCENARIOS]
    if bad:
        p.error(f"--only: unknown scenarios {bad}; known: {', '.join(SCENARIOS)}")
    result = run(Path(a.out), FaultsConfig.quick() if a.quick else FaultsConfig(), only=only, work=Path(a.work) if a.work else None)
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
