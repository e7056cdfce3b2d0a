"""Locust load test of the Parity gRPC server (closed loop, many users; see bench/latency.py for
the open-loop harness).

    locust -f bench/locustfile.py --headless --host 127.0.0.1:50051 --users 40 --spawn-rate 20 \
        --run-time 60s --csv bench/results/locust --parity-events DATA_DIR

Each simulated user keeps one gRPC channel whose interceptor reports every call (name,
response time in ms, response size, exception) to Locust's `environment.events.request`, and
runs Recommend (weight 8), Rank (2) and IngestEvents (1) for a 70/10/20 mix of known, new and
heavy users (ids from --parity-events; synthetic ids without it), at most
--parity-user-rps tasks per second each (so the offered load is about users x that rate).
Loopback hosts only (127.0.0.0/8, localhost, ::1).
"""
from __future__ import annotations

import os
import random
import time
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant_throughput, events, task
from locust.exception import LocustError

from bench.latency import UserMix, check_loopback
from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc

# Locust runs users as gevent greenlets: gRPC's blocking calls must yield to gevent. This must
# happen after the standard library is patched (importing locust does that) and before any
# gRPC object exists.
grpc_gevent.init_gevent()

__all__ = ["LocustInterceptor", "ParityGrpcUser", "Workload"]


# -- reporting ---------------------------------------------------------------------------------
class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Reports each unary / client-streaming call to `environment.events.request`."""

    def __init__(self, environment: Any, request_type: str = "grpc") -> None:
        self.env = environment
        self.request_type = request_type

    def _measure(self, continuation, details: grpc.ClientCallDetails, request: Any):
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        name = method.rsplit("/", 1)[-1]
        start = time.perf_counter()
        response = None
        length = 0
        exc: BaseException | None = None
        call = None
        try:
            call = continuation(details, request)
            response = call.result()  # waits; raises the grpc.RpcError of a failed call
            length = response.ByteSize()
        except grpc.RpcError as e:
            exc = e
        except Exception as e:  # noqa: BLE001 - reported to Locust, then re-raised below
            exc = e
        self.env.events.request.fire(request_type=self.request_type, name=name, response_time=(time.perf_counter() - start) * 1000.0,
                                     response_length=length, response=response, context={}, exception=exc)
        if call is None:
            raise exc  # type: ignore[misc]
        return call

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._measure(continuation, client_call_details, request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return self._measure(continuation, client_call_details, request_iterator)


# -- what to send ------------------------------------------------------------------------------
class Workload:
    """User ids (70/10/20 known/new/heavy), catalogue item ids and event times, from a data dir."""

    def __init__(self, data_dir: str | None, seed: int | None = None) -> None:
        self.rng = random.Random(seed)
        if data_dir:
            import pyarrow.parquet as pq

            from features.datasets import load_info
            from parity.workspace import open_workspace

            ws = open_workspace(data_dir)
            self.mix = UserMix.from_data_dir(ws.data_dir)
            items_file = ws.data_dir / "items.parquet"
            self.items = [int(x) for x in pq.read_table(items_file, columns=["item_id"]).column("item_id").to_pylist()] if items_file.is_file() else list(range(500))
            end_ms = int(load_info(ws.data_dir).end_ts)
        else:
            self.mix = UserMix.synthetic()
            self.items = list(range(500))
            end_ms = int(time.time() * 1000)
        # The server's clock: a log that ended > 1 day ago is replayed from its end (clock "auto").
        wall_ms = int(time.time() * 1000)
        self._base_ms = end_ms if wall_ms - end_ms > 86_400_000 else wall_ms
        self._started = time.monotonic()
        self._ids = self.mix.sample(20_000, seed=self.rng.randrange(2**31))

    def user_id(self) -> str:
        return self.rng.choice(self._ids)

    def candidates(self, n: int = 50) -> list[str]:
        return [str(i) for i in self.rng.sample(self.items, min(n, len(self.items)))]

    def now_ms(self) -> int:
        return self._base_ms + int((time.monotonic() - self._started) * 1000)

    def live_events(self, user_id: str, n: int = 5) -> list[pb.Event]:
        now = self.now_ms()
        types = ("impression", "play", "play", "like", "skip")
        events = []
        for _ in range(n):
            t = self.rng.choice(types)
            # What the server's event rules admit: counted events weigh 1; a play lasts under a
            # minute, within twice the shortest simulated item (30 s).
            value = float(self.rng.randrange(1, 60)) if t == "play" else 1.0
            events.append(pb.Event(event_id=str(self.rng.randrange(10**15, 2**62)), ts_ms=now - self.rng.randrange(0, 5000),
                                   user_id=user_id, item_id=str(self.rng.choice(self.items)), type=t, value=value))
        return events


_WORKLOAD: dict[str, Workload] = {}


def _workload(data_dir: str | None) -> Workload:
    key = data_dir or ""
    if key not in _WORKLOAD:  # one per process: reading the log once serves every user
        _WORKLOAD[key] = Workload(data_dir)
    return _WORKLOAD[key]


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--parity-events", default=os.environ.get("PARITY_LOADTEST_EVENTS", ""), help="data dir the server serves (user and item ids)")
    parser.add_argument("--parity-user-rps", type=float, default=float(os.environ.get("PARITY_LOADTEST_USER_RPS", "5")),
                        help="most tasks per second per simulated user (default 5)")
    parser.add_argument("--parity-timeout", type=float, default=1.0, help="deadline of each call in seconds (default 1)")
    parser.add_argument("--parity-token", default=os.environ.get("PARITY_LOADTEST_TOKEN", ""),
                        help="bearer token for IngestEvents (the server's ingest or admin token; env PARITY_LOADTEST_TOKEN)")


def _option(env: Any, name: str, default: Any) -> Any:
    opts = getattr(env, "parsed_options", None)
    return getattr(opts, name, default) if opts is not None else default


@events.init.add_listener
def _read_workload(environment: Any, **_kwargs: Any) -> None:
    """Read the data dir before the run starts, then refresh the event loop's clock: gevent's
    loop caches "now", and --run-time's timer is set from it, so seconds of start-up work before
    it (reading the log on a slow machine) came out of a short run (a 3 s run stopped 0.7 s
    after its users spawned)."""
    _workload(_option(environment, "parity_events", "") or os.environ.get("PARITY_LOADTEST_EVENTS") or None)
    gevent.get_hub().loop.update_now()


# -- the user ----------------------------------------------------------------------------------
class ParityGrpcUser(User):
    """One client of the Recommender service with its own channel."""

    def wait_time(self) -> float:  # constant throughput per user: --parity-user-rps
        return constant_throughput(float(_option(self.environment, "parity_user_rps", 5.0)))(self)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        host = self.host or getattr(environment, "host", None)  # Locust copies --host onto the class when it spawns
        if not host:
            raise LocustError("no --host: give the server as HOST:PORT, e.g. --host 127.0.0.1:50051")
        try:
            self.target = check_loopback(host)
        except ValueError as exc:
            raise LocustError(str(exc)) from None
        self.timeout_s = float(_option(environment, "parity_timeout", 1.0))
        token = _option(environment, "parity_token", "") or os.environ.get("PARITY_LOADTEST_TOKEN", "")
        self.ingest_md = [("authorization", f"Bearer {token}")] if token else []
        self.work = _workload(_option(environment, "parity_events", "") or os.environ.get("PARITY_LOADTEST_EVENTS") or None)
        self._channel = grpc.intercept_channel(grpc.insecure_channel(self.target), LocustInterceptor(environment))
        self.stub = pb_grpc.RecommenderStub(self._channel)

    def on_stop(self) -> None:
        self._channel.close()

    def _call(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, timeout=self.timeout_s, **kwargs)
        except grpc.RpcError:
            pass  # already reported to Locust by the interceptor

    @task(8)
    def recommend(self) -> None:
        self._call(self.stub.Recommend, pb.RecommendRequest(user_id=self.work.user_id(), k=10))

    @task(2)
    def rank(self) -> None:
        self._call(self.stub.Rank, pb.RankRequest(user_id=self.work.user_id(), item_ids=self.work.candidates(50)))

    @task(1)
    def ingest(self) -> None:
        self._call(self.stub.IngestEvents, iter(self.work.live_events(self.work.user_id())), metadata=self.ingest_md)
