"""Open-loop latency harness for the Recommender service (`parity bench latency`).

Requests go out at a fixed arrival rate: request i is due at t0 + i/qps, whatever happened to
the earlier ones (they never wait for each other), on one asyncio loop over one reused
grpc.aio channel. Each latency is measured from the request's INTENDED send time, so when
the server (or this load generator) stalls, the queueing delay lands in the percentiles
instead of silently lowering the offered rate (no coordinated omission).

    rep = run_latency("127.0.0.1:50051", qps=100, seconds=10, user_ids=UserMix.from_data_dir(d).sample(1000))
    print(rep.p99_ms, rep.errors)

Bounded: at most MAX_REQUESTS requests, at most MAX_SECONDS of sending, at most
`concurrency_cap` requests in flight (beyond it a due request is not sent and is counted as
the error CLIENT_CONCURRENCY_CAP), every request carries the deadline `timeout_s`.
Loopback targets only: a host outside 127.0.0.0/8, localhost and ::1 is refused.

Percentiles are over successful responses; errors are counted by status code beside them.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["LatencyReport", "UserMix", "run_latency", "window_figures", "parse_target", "check_loopback", "MAX_REQUESTS", "MAX_SECONDS"]

MAX_REQUESTS = 2_000_000
MAX_SECONDS = 3600.0
CAP_ERROR = "CLIENT_CONCURRENCY_CAP"


# -- targets --------------------------------------------------------------------------------
def parse_target(target: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' (an optional scheme such as grpc:// is dropped) -> (host, port)."""
    t = target.strip()
    if "://" in t:
        t = t.split("://", 1)[1]
    t = t.rstrip("/")
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"target {target!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = t.rpartition(":")
        if not sep or not host:
            raise ValueError(f"target {target!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"target {target!r}: port must be an integer, got {port_text!r}") from None
    if not 0 < port <= 65535:
        raise ValueError(f"target {target!r}: port must be in [1, 65535], got {port}")
    return host, port


def check_loopback(target: str) -> str:
    """The target normalised for gRPC ('HOST:PORT'); ValueError unless it is on this machine."""
    host, port = parse_target(target)
    ok = host.lower() == "localhost"
    if not ok:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        ok = ip is not None and (ip in ipaddress.ip_network("127.0.0.0/8") or ip == ipaddress.ip_address("::1"))
    if not ok:
        raise ValueError(f"target {target!r}: load tests may only target this machine (127.0.0.0/8, localhost or ::1), not {host!r}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- user ids ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserMix:
    """Known users (in the data), new users (ids above any known one), heavy users (most active).

    `sample(n)` draws user ids (as strings) with the given shares, default 70/10/20.
    """

    known: np.ndarray
    heavy: np.ndarray
    new_start: int
    shares: tuple[float, float, float] = (0.7, 0.1, 0.2)  # known, new, heavy

    @classmethod
    def from_data_dir(cls, path: str | Path, heavy_fraction: float = 0.05, shares: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> "UserMix":
        """Users from the data dir's users.parquet (or its event log) and their activity in the log."""
        from parity.workspace import open_workspace

        ws = open_workspace(path)
        counts_tbl = ws.log.read_table(columns=["user_id"])
        uids = counts_tbl.column("user_id").to_numpy()
        users_file = ws.data_dir / "users.parquet"
        if users_file.is_file():
            import pyarrow.parquet as pq

            known = pq.read_table(users_file, columns=["user_id"]).column("user_id").to_numpy().astype(np.int64)
        else:
            known = np.unique(uids).astype(np.int64)
        if len(known) == 0:
            raise ValueError(f"--events {path}: no users in this data dir")
        if len(uids):
            ids, counts = np.unique(uids, return_counts=True)
            n_heavy = max(1, int(round(len(ids) * heavy_fraction)))
            heavy = ids[np.argsort(-counts, kind="stable")[:n_heavy]].astype(np.int64)
        else:
            heavy = known[:1]
        return cls(known=known, heavy=heavy, new_start=int(max(known.max(), uids.max() if len(uids) else 0)) + 1, shares=shares)

    @classmethod
    def synthetic(cls, n_known: int = 1000, shares: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> "UserMix":
        """Without a data dir: ids 0..n_known-1 as known, the first 5 % as heavy."""
        known = np.arange(n_known, dtype=np.int64)
        return cls(known=known, heavy=known[: max(1, n_known // 20)], new_start=n_known, shares=shares)

    def sample(self, n: int, seed: int = 0) -> list[str]:
        rng = np.random.default_rng(seed)
        p = np.asarray(self.shares, dtype=float)
        if p.min() < 0 or p.sum() <= 0:
            raise ValueError(f"user mix shares must be >= 0 with a positive sum, got {self.shares}")
        kind = rng.choice(3, size=n, p=p / p.sum())
        out = np.empty(n, dtype=np.int64)
        m = kind == 0
        out[m] = rng.choice(self.known, size=int(m.sum()))
        m = kind == 1
        out[m] = self.new_start + rng.integers(0, 1_000_000, size=int(m.sum()))
        m = kind == 2
        out[m] = rng.choice(self.heavy, size=int(m.sum()))
        return [str(int(u)) for u in out]


# -- the report --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyReport:
    target: str
    qps_target: float
    seconds: float
    qps_achieved: float  # successful responses per second over the run (first due time to last answer)
    sent: int  # requests put on the wire
    ok: int
    errors: dict[str, int]  # by status code name (CLIENT_CONCURRENCY_CAP: due but not sent)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    send_lag_max_ms: float  # worst delay between a request's due time and its actual send (load-generator health)
    latencies_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)  # every OK latency, in send order
    windows: tuple[dict, ...] = field(default=(), repr=False, compare=False)  # per window of due time: t_s, ok, errors, p50_ms, p99_ms

    @property
    def n_errors(self) -> int:
        return int(sum(self.errors.values()))

    def summary(self) -> dict:
        """The JSON line: qps, p50_ms, p99_ms, errors (a count) and the rest of the figures."""
        d = asdict(self)
        d.pop("latencies_ms")
        d.pop("windows")
        d["errors_by_code"] = d.pop("errors")
        d["errors"] = self.n_errors
        d["qps"] = self.qps_target
        return {k: ((round(v, 3) if math.isfinite(v) else None) if isinstance(v, float) else v) for k, v in d.items()}

    def table(self) -> str:
        rows = [
            ("target", self.target),
            ("offered rate", f"{self.qps_target:g} req/s for {self.seconds:g} s"),
            ("achieved", f"{self.qps_achieved:.1f} ok/s"),
            ("sent / ok / errors", f"{self.sent} / {self.ok} / {self.n_errors}" + (f"  {self.errors}" if self.errors else "")),
            ("p50 / p90", f"{self.p50_ms:.2f} / {self.p90_ms:.2f} ms"),
            ("p99 / p99.9", f"{self.p99_ms:.2f} / {self.p999_ms:.2f} ms"),
            ("max / mean", f"{self.max_ms:.2f} / {self.mean_ms:.2f} ms"),
            ("worst send lag", f"{self.send_lag_max_ms:.2f} ms"),
        ]
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _pct(lat: np.ndarray, q: float) -> float:
    return float(np.percentile(lat, q)) if len(lat) else float("nan")


# -- the run -----------------------------------------------------------------------------------
def run_latency(target: str, qps: float, seconds: float, *, user_ids: Sequence[str | int] | None = None, k: int = 10, timeout_s: float = 1.0,
                concurrency_cap: int = 1000, warmup: int = 20, connect_timeout_s: float = 5.0, seed: int = 0,
                window_s: float | None = None, channels: int = 1) -> LatencyReport:
    """Offer `qps` Recommend requests per second for `seconds` to `target` (loopback only).

    `channels` > 1 spreads the requests round-robin over that many connections (each its own
    TCP connection), so a fleet of workers sharing the port with SO_REUSEPORT, which the
    kernel balances per connection, all get load.

    `user_ids` are cycled through in order (default: a synthetic 70/10/20 mix over ids 0..999);
    `warmup` requests are sent one by one first and not counted. With `window_s`, the report
    also holds per-window figures by due time (a soak's p99 over time).
    """
    if window_s is not None and not (math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"window_s must be a finite number > 0, got {window_s!r}")
    target_n = check_loopback(target)
    if not (isinstance(qps, (int, float)) and math.isfinite(qps) and qps > 0):
        raise ValueError(f"qps must be a finite number > 0, got {qps!r}")
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise ValueError(f"seconds must be in (0, {MAX_SECONDS:g}], got {seconds!r}")
    n = int(round(qps * seconds))
    if n < 1:
        raise ValueError(f"qps x seconds must make at least one request, got {qps} x {seconds}")
    if n > MAX_REQUESTS:
        raise ValueError(f"qps x seconds = {n} requests, more than the limit {MAX_REQUESTS}")
    if timeout_s <= 0 or not math.isfinite(timeout_s):
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    if concurrency_cap < 1:
        raise ValueError(f"concurrency_cap must be >= 1, got {concurrency_cap}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
    ids = [str(u) for u in (user_ids if user_ids is not None else UserMix.synthetic().sample(max(n, 1), seed=seed))]
    if not ids:
        raise ValueError("user_ids must not be empty")
    return asyncio.run(_run(target_n, float(qps), float(seconds), n, ids, int(k), float(timeout_s), int(concurrency_cap), int(warmup),
                            float(connect_timeout_s), window_s, channels))


def window_figures(lat: np.ndarray, qps: float, window_s: float) -> tuple[dict, ...]:
    """Per window of due time (request i is due at i/qps): ok, errors (NaN = not OK), p50, p99."""
    per = max(1, int(round(qps * window_s)))
    out = []
    for a in range(0, len(lat), per):
        w = lat[a : a + per]
        ok = w[~np.isnan(w)]
        out.append({"t_s": round(a / qps, 3), "ok": int(len(ok)), "errors": int(len(w) - len(ok)),
                    "p50_ms": round(_pct(ok, 50), 3) if len(ok) else None, "p99_ms": round(_pct(ok, 99), 3) if len(ok) else None})
    return tuple(out)


async def _run(target: str, qps: float, seconds: float, n: int, ids: list[str], k: int, timeout_s: float, cap: int, warmup: int,
               connect_timeout_s: float, window_s: float | None = None, channels: int = 1) -> LatencyReport:
    from parity_api.v1 import recommender_pb2 as pb

    reqs = [pb.RecommendRequest(user_id=ids[i % len(ids)], k=k) for i in range(n)]
    # Precaution (not measured on its own): keep the collector from walking the prepared
    # requests mid-run, where a pause would delay sends and count as latency. No unfreeze:
    # it would also unfreeze a server running in this process (server/heap.py); frozen
    # objects are still freed by reference counting.
    gc.collect()
    gc.freeze()
    return await _offer(target, qps, seconds, n, reqs, timeout_s, cap, warmup, connect_timeout_s, window_s, channels)


async def _offer(target: str, qps: float, seconds: float, n: int, reqs: list, timeout_s: float, cap: int, warmup: int,
                 connect_timeout_s: float, window_s: float | None, channels: int = 1) -> LatencyReport:
    import grpc

    from parity_api.v1 import recommender_pb2_grpc as pb_grpc
    lat = np.full(n, np.nan)
    codes: dict[str, int] = {}
    sent = 0
    lag_max = 0.0
    in_flight = 0

    # one subchannel pool per channel: otherwise gRPC shares one connection among them
    opts = [("grpc.use_local_subchannel_pool", 1)] if channels > 1 else None
    async with contextlib.AsyncExitStack() as stack:
        chans = [await stack.enter_async_context(grpc.aio.insecure_channel(target, options=opts)) for _ in range(channels)]
        try:
            for channel in chans:
                await asyncio.wait_for(channel.channel_ready(), connect_timeout_s)
        except asyncio.TimeoutError:
            raise ConnectionError(f"cannot reach a gRPC server at {target} within {connect_timeout_s:g} s") from None
        stubs = [pb_grpc.RecommenderStub(c) for c in chans]
        for i in range(warmup):
            try:
                await stubs[i % channels].Recommend(reqs[i % n], timeout=max(timeout_s, 5.0))
            except grpc.aio.AioRpcError:
                pass

        clock = time.perf_counter

        async def one(i: int, due: float) -> None:
            nonlocal in_flight
            try:
                await stubs[i % channels].Recommend(reqs[i], timeout=timeout_s)
                lat[i] = (clock() - due) * 1000.0
            except grpc.aio.AioRpcError as exc:
                name = exc.code().name
                codes[name] = codes.get(name, 0) + 1
            except Exception as exc:  # noqa: BLE001 - a client-side failure still counts as an error
                name = type(exc).__name__
                codes[name] = codes.get(name, 0) + 1
            finally:
                in_flight -= 1

        tasks: list[asyncio.Task] = []
        t0 = clock() + 0.01
        for i in range(n):
            due = t0 + i / qps
            wait = due - clock()
            if wait > 0:
                await asyncio.sleep(wait)
            lag_max = max(lag_max, clock() - due)
            if in_flight >= cap:
                codes[CAP_ERROR] = codes.get(CAP_ERROR, 0) + 1
                continue
            in_flight += 1
            sent += 1
            tasks.append(asyncio.ensure_future(one(i, due)))
        if tasks:  # every request has its own deadline, so this ends within timeout_s (plus slack)
            await asyncio.wait(tasks, timeout=timeout_s + 5.0)
        end = clock()
        for t in tasks:
            if not t.done():
                t.cancel()

    ok_lat = lat[~np.isnan(lat)]
    elapsed = max(end - t0, 1e-9)
    return LatencyReport(
        target=target, qps_target=qps, seconds=seconds, qps_achieved=len(ok_lat) / elapsed, sent=sent, ok=int(len(ok_lat)), errors=dict(sorted(codes.items())),
        p50_ms=_pct(ok_lat, 50), p90_ms=_pct(ok_lat, 90), p99_ms=_pct(ok_lat, 99), p999_ms=_pct(ok_lat, 99.9),
        max_ms=float(ok_lat.max()) if len(ok_lat) else float("nan"), mean_ms=float(ok_lat.mean()) if len(ok_lat) else float("nan"),
        send_lag_max_ms=lag_max * 1000.0, latencies_ms=tuple(float(x) for x in ok_lat),
        windows=window_figures(lat, qps, window_s) if window_s else (),
    )
