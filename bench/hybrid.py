"""Hybrid (device + server) against server-only recommendations, behind a faulty network.

Both legs call Recommend through the same fault-injecting proxy (bench/delay_proxy.py: by
default 20 % of calls delayed 80-200 ms, 5 % never answered), each from the same seeded fault
sequence (the proxy is reset before each leg), N calls one at a time then N calls from
`concurrency` threads back to back:

  server_only   a plain client: one Recommend per call, a `deadline_s` (1 s) deadline, no retry
  hybrid        a caller-supplied `hybrid_call(user_id) -> (source, items)`, e.g. the mobile
                SDK's `Client.recommend` pointed at the proxy; `source` names who answered
                ("server", "device", ...) and is counted. An exception is a failure.

Per leg and phase (sequential, concurrent, all): calls, ok, failures by gRPC code or exception
type, end-to-end latency over every call (what a user waited, failed calls included, in ms:
p50/p95/p99/max/mean) and over the answered calls only, and the share of calls answered by each
source. Beside them, the proxy's own cost: p50 of direct calls against the same upstream vs p50
through a fault-free proxy, interleaved in the same run.

    rep = run_hybrid(upstream, user_ids, hybrid_call=sdk.recommend_via(proxy_target), n=200, concurrency=8)

The measuring core (`measure`, `run_hybrid`, `proxy_overhead`) is complete and tested against
bench/echo_upstream.py. CLI:

    python -m bench.hybrid --echo --quick --out bench/results/hybrid.json          # self-check, no release
    python -m bench.hybrid --upstream 127.0.0.1:50051 --out ...                     # a running server
    python -m bench.hybrid --release R --data D [--bundle B --keys K] --out ...     # starts a server on R; the SDK leg
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from bench.delay_proxy import DelayProxy, FaultPlan

__all__ = ["HybridCall", "ServerOnlyClient", "standin_hybrid", "measure", "summarize", "run_hybrid", "proxy_overhead", "main"]

HybridCall = Callable[[str], "tuple[str, Sequence[Any]]"]
RECOMMEND = "/parity.v1.Recommender/Recommend"
SEQUENTIAL, CONCURRENT = "sequential", "concurrent"


# -- the callers ---------------------------------------------------------------------------------
class ServerOnlyClient:
    """The server-only leg: one Recommend per call on one reused channel, a fixed deadline, no
    retry. A callable `user_id -> ("server", items)` like a hybrid call; thread-safe."""

    def __init__(self, target: str, deadline_s: float = 1.0, k: int = 10) -> None:
        from parity_api.v1 import recommender_pb2 as pb

        self._pb = pb
        self.target, self.deadline_s, self.k = target, deadline_s, k
        self._channel = grpc.insecure_channel(target)
        self._recommend = self._channel.unary_unary(RECOMMEND, request_serializer=pb.RecommendRequest.SerializeToString,
                                                    response_deserializer=pb.RecommendResponse.FromString)

    def __call__(self, user_id: str) -> tuple[str, list]:
        resp = self._recommend(self._pb.RecommendRequest(user_id=str(user_id), k=self.k), timeout=self.deadline_s)
        return "server", list(resp.items)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ServerOnlyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def standin_hybrid(server: ServerOnlyClient, budget_s: float = 0.15, k: int = 10) -> HybridCall:
    """A STAND-IN for the SDK (used by --echo and the tests, never reported as the SDK): ask the
    server with a short budget, answer from a fixed local list when it does not answer in time."""
    from parity_api.v1 import recommender_pb2 as pb

    local = [pb.ScoredItem(item_id=str(i), score=0.0, source="local") for i in range(k)]

    def call(user_id: str) -> tuple[str, list]:
        try:
            resp = server._recommend(pb.RecommendRequest(user_id=str(user_id), k=k), timeout=budget_s)
            return "server", list(resp.items)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                return "local", local
            raise

    return call


# -- measuring -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    phase: str
    latency_ms: float
    source: str | None  # None: failed
    error: str | None  # gRPC code name or exception type


def _one(call: HybridCall, user_id: str, phase: str) -> Record:
    t = time.perf_counter()
    try:
        source, _items = call(user_id)
        source, error = str(source), None
    except grpc.RpcError as exc:
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        source, error = None, code.name if code is not None else type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - a failed call is a result, not a crash of the benchmark
        source, error = None, type(exc).__name__
    return Record(phase, (time.perf_counter() - t) * 1000.0, source, error)


def measure(call: HybridCall, user_ids: Sequence[str], n: int, concurrency: int) -> list[Record]:
    """N calls one at a time, then N calls from `concurrency` threads, each thread calling back to
    back (closed loop). User ids are taken in order, cycling; `call` must be thread-safe."""
    if n <= 0 or concurrency <= 0 or not user_ids:
        raise ValueError("n and concurrency must be positive and user_ids non-empty")
    ids = [str(user_ids[i % len(user_ids)]) for i in range(2 * n)]
    records = [_one(call, u, SEQUENTIAL) for u in ids[:n]]
    with futures.ThreadPoolExecutor(concurrency, thread_name_prefix="hybrid-bench") as pool:
        records += list(pool.map(lambda u: _one(call, u, CONCURRENT), ids[n:]))
    return records


def _percentiles(ms: Sequence[float]) -> dict[str, float | None]:
    if not len(ms):
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(ms, dtype=float)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "max": round(float(a.max()), 3), "mean": round(float(a.mean()), 3)}


def summarize(records: Sequence[Record]) -> dict[str, Any]:
    """calls, ok, failures {code: count}, latency_ms (every call), ok_latency_ms, sources {source: share of calls}."""
    n = len(records)
    ok = [r for r in records if r.source is not None]
    failures: dict[str, int] = {}
    sources: dict[str, int] = {}
    for r in records:
        if r.source is None:
            failures[r.error or "?"] = failures.get(r.error or "?", 0) + 1
        else:
            sources[r.source] = sources.get(r.source, 0) + 1
    return {
        "calls": n, "ok": len(ok), "failed": n - len(ok), "failures": dict(sorted(failures.items())),
        "latency_ms": _percentiles([r.latency_ms for r in records]),
        "ok_latency_ms": _percentiles([r.latency_ms for r in ok]),
        "sources": {s: round(c / n, 4) for s, c in sorted(sources.items())} if n else {},
    }


def _leg(proxy: DelayProxy, plan: FaultPlan, call: HybridCall, user_ids: Sequence[str], n: int, concurrency: int, warmup: int) -> dict:
    proxy.reset(FaultPlan(delay_share=0.0, drop_share=0.0, seed=plan.seed))
    for u in list(user_ids)[:warmup]:  # connections, first-call costs: not measured, no faults
        _one(call, str(u), "warmup")
    proxy.reset(plan)  # every leg sees the same seeded fault sequence
    t = time.perf_counter()
    records = measure(call, user_ids, n, concurrency)
    out = {"wall_s": round(time.perf_counter() - t, 3)}
    out.update({phase: summarize([r for r in records if r.phase == phase]) for phase in (SEQUENTIAL, CONCURRENT)})
    out["all"] = summarize(records)
    out["proxy_counts"] = proxy.counts
    return out


def proxy_overhead(upstream: str, n: int = 300, deadline_s: float = 5.0, user_id: str = "1") -> dict[str, Any]:
    """What the proxy itself adds: Recommend direct to `upstream` vs through a fault-free proxy,
    alternating one call each way (same run, same upstream), sequential. Milliseconds."""
    with DelayProxy(upstream, FaultPlan(delay_share=0.0, drop_share=0.0), connect_timeout_s=10.0) as proxy, \
            ServerOnlyClient(upstream, deadline_s) as direct, ServerOnlyClient(proxy.target, deadline_s) as via:
        for c in (direct, via):
            c.wait_ready()
            for _ in range(20):
                c(user_id)
        d, p = [], []
        for _ in range(n):
            for c, into in ((direct, d), (via, p)):
                t = time.perf_counter()
                c(user_id)
                into.append((time.perf_counter() - t) * 1000.0)
    dp, pp = _percentiles(d), _percentiles(p)
    return {"n": n, "direct_ms": dp, "proxy_ms": pp, "added_p50_ms": round(pp["p50"] - dp["p50"], 3),
            "added_p99_ms": round(pp["p99"] - dp["p99"], 3)}


def run_hybrid(upstream: str, user_ids: Sequence[str], *, hybrid_call: Callable[[str], HybridCall] | None = None,
               plan: FaultPlan | None = None, n: int = 200, concurrency: int = 8, deadline_s: float = 1.0, k: int = 10,
               warmup: int = 10, overhead_n: int = 300) -> dict[str, Any]:
    """Both legs through one proxy in front of `upstream`. `hybrid_call` is a factory: given the
    proxy's target ("127.0.0.1:PORT") it returns the `user_id -> (source, items)` callable (so
    the SDK can be pointed at the proxy); None runs the server-only leg alone."""
    plan = plan if plan is not None else FaultPlan()
    result: dict[str, Any] = {"upstream": upstream, "plan": asdict(plan), "n": n, "concurrency": concurrency, "deadline_s": deadline_s, "k": k}
    with DelayProxy(upstream, FaultPlan(delay_share=0.0, drop_share=0.0), connect_timeout_s=10.0) as proxy:
        with ServerOnlyClient(proxy.target, deadline_s, k) as server_only:
            server_only.wait_ready()
            result["server_only"] = _leg(proxy, plan, server_only, user_ids, n, concurrency, warmup)
            result["hybrid"] = None
            if hybrid_call is not None:
                result["hybrid"] = _leg(proxy, plan, hybrid_call(proxy.target), user_ids, n, concurrency, warmup)
    result["proxy_overhead"] = proxy_overhead(upstream, overhead_n) if overhead_n else None
    return result


# -- command line ----------------------------------------------------------------------------------
def sdk_hybrid_call(bundle: Path, keys_dir: Path | Any, user_ids: Sequence[int], cache_root: Path, *, k: int = 10,
                    server_deadline_s: float = 0.040) -> Callable[[str], HybridCall]:
    """The SDK leg: one device (a mobile_sdk.Client with its own cache) per user, each synced once
    from `bundle` through the CDN stand-in, then working from its cache; the factory points every
    device's gRPC transport at the proxy and returns `user_id -> (source, items)` from
    `Client.recommend` (server deadline `server_deadline_s`, device fallback). The source is
    "server" or "device:<user|popular>"."""
    from export.device.cdn import BackgroundCDN
    from export.device.keys import BundleKeys, load_keys
    from mobile_sdk import Client, GrpcTransport

    keys = keys_dir if isinstance(keys_dir, BundleKeys) else load_keys(keys_dir)
    caches = {int(u): Path(cache_root) / f"device-{int(u)}" for u in user_ids}
    with BackgroundCDN(bundle) as cdn:
        for u, cache in caches.items():
            with Client(cdn.url, cache, keys.public_pem, keys.token(u)) as c:
                c.sync()

    def factory(target: str) -> HybridCall:
        offline = "http://127.0.0.1:9/"  # the CDN is gone: devices rank from their caches
        clients = {u: Client(offline, cache, keys.public_pem, keys.token(u), transport=GrpcTransport(target)) for u, cache in caches.items()}

        def call(user_id: str) -> tuple[str, list]:
            r = clients[int(user_id)].recommend(int(user_id), k=k, deadline_s=server_deadline_s)
            return (r.source if r.source == "server" else f"device:{r.source}"), list(r)
        return call
    return factory


def main(argv: Sequence[str] | None = None) -> int:
    from bench.latency import check_loopback
    from bench.report import machine, write_json

    p = argparse.ArgumentParser(prog="python -m bench.hybrid", description="Hybrid vs server-only Recommend latency behind a faulty proxy.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--echo", action="store_true", help="a built-in fake Recommend upstream and a stand-in hybrid (self-check of the harness)")
    where.add_argument("--upstream", help="HOST:PORT of a running Parity server (this machine only)")
    where.add_argument("--release", type=Path, help="release folder: start a server on it (with --data)")
    p.add_argument("--data", type=Path, help="data dir for --release")
    p.add_argument("--bundle", type=Path, help="device bundle for the hybrid leg (the mobile SDK; needs --keys)")
    p.add_argument("--keys", type=Path, help="the bundle's key folder (user tokens for the devices)")
    p.add_argument("--out", type=Path, default=Path("bench/results/hybrid.json"))
    p.add_argument("--n", type=int, default=300, help="calls per phase per leg (sequential, then concurrent; default 300)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--deadline-s", type=float, default=1.0, help="the server-only client's deadline (default 1 s)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--delay-share", type=float, default=FaultPlan.delay_share)
    p.add_argument("--drop-share", type=float, default=FaultPlan.drop_share)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: 20 calls per phase, 4 threads, 50 overhead pairs")
    args = p.parse_args(argv)
    if args.release is not None and args.data is None:
        p.error("--release needs --data")
    n, conc, overhead_n = (20, 4, 50) if args.quick else (args.n, args.concurrency, 300)
    try:
        plan = FaultPlan(delay_share=args.delay_share, drop_share=args.drop_share, seed=args.seed)
    except ValueError as exc:
        p.error(str(exc))

    stop: Callable[[], None] = lambda: None  # noqa: E731
    hybrid = None
    if args.echo:
        from bench.echo_upstream import EchoUpstream

        up = EchoUpstream(record=False).start()
        opened: list[ServerOnlyClient] = []

        def stop() -> None:
            for c in opened:
                c.close()
            up.stop()

        upstream, kind = up.target, "echo (fake Recommend)"
        user_ids = [str(i) for i in range(100)]

        def hybrid(target: str) -> HybridCall:
            opened.append(ServerOnlyClient(target, args.deadline_s, args.k))
            return standin_hybrid(opened[-1], k=args.k)
    else:
        if args.upstream:
            upstream, kind = check_loopback(args.upstream), "running server"
            user_ids = [str(i) for i in range(1000)]  # without --data: ids 0..999
            if args.data is not None:
                from bench.latency import UserMix

                user_ids = [str(u) for u in UserMix.from_data_dir(args.data).sample(2 * n, seed=args.seed)]
        else:
            from bench.latency import UserMix
            from server.app import BackgroundServer
            from server.config import ServerConfig

            cfg = ServerConfig(release=args.release, data_dir=args.data, host="127.0.0.1", port=0, metrics_port=None, drain_grace_s=2.0)
            srv = BackgroundServer(cfg).start()
            upstream, stop, kind = f"127.0.0.1:{srv.port}", srv.stop, f"parity server on {args.release}"
            user_ids = [str(u) for u in UserMix.from_data_dir(args.data).sample(2 * n, seed=args.seed)]
        if args.bundle is not None:
            if args.keys is None:
                stop()
                p.error("--bundle needs --keys")
            import tempfile

            caches = tempfile.TemporaryDirectory(prefix="parity-hybrid-")
            devices = sorted({int(u) for u in user_ids})[:32]
            user_ids = [str(u) for u in devices]
            hybrid = sdk_hybrid_call(args.bundle, args.keys, devices, Path(caches.name), k=args.k)
            prev_stop = stop

            def stop() -> None:
                prev_stop()
                caches.cleanup()
    try:
        result = run_hybrid(upstream, user_ids, hybrid_call=hybrid, plan=plan, n=n, concurrency=conc,
                            deadline_s=args.deadline_s, k=args.k, overhead_n=overhead_n)
    finally:
        stop()
    result.update({"bench": "hybrid", "upstream_kind": kind, "quick": args.quick, "machine": machine(),
                   "command": "python -m bench.hybrid " + " ".join(sys.argv[1:] if argv is None else argv),
                   "hybrid_is_standin": bool(args.echo)})
    write_json(args.out, result)
    so = result["server_only"]["all"]
    print(f"server_only: p50 {so['latency_ms']['p50']} ms, p99 {so['latency_ms']['p99']} ms, failed {so['failed']}/{so['calls']}")
    if result["hybrid"]:
        hy = result["hybrid"]["all"]
        print(f"hybrid{' (stand-in)' if args.echo else ''}: p50 {hy['latency_ms']['p50']} ms, p99 {hy['latency_ms']['p99']} ms, "
              f"failed {hy['failed']}/{hy['calls']}, sources {hy['sources']}")
    ov = result["proxy_overhead"]
    print(f"proxy overhead: +{ov['added_p50_ms']} ms p50 (direct {ov['direct_ms']['p50']} ms, via proxy {ov['proxy_ms']['p50']} ms)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
