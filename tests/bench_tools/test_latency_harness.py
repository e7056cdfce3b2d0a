"""The load tools: the open-loop harness (bench/latency.py), its CLI (parity/cli_bench.py) and
the Locust user (bench/locustfile.py), against a real server on a tiny release (127.0.0.1)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from bench.latency import UserMix, check_loopback, run_latency
from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc
from server.app import BackgroundServer
from server.config import ServerConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(small_sim: Path, release_dir: Path) -> Iterator[BackgroundServer]:
    cfg = ServerConfig(release=release_dir, data_dir=small_sim, host="127.0.0.1", port=0, metrics_port=None, cpu_threads=2, io_threads=4,
                       drain_grace_s=2.0, ingest_token="locust-token")
    with BackgroundServer(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def target(server: BackgroundServer) -> str:
    return f"127.0.0.1:{server.port}"


def test_user_mix_draws_known_new_and_heavy_users(small_sim: Path) -> None:
    mix = UserMix.from_data_dir(small_sim)
    ids = [int(u) for u in mix.sample(2000, seed=1)]
    known = set(mix.known.tolist())
    new = [u for u in ids if u >= mix.new_start]
    assert new and all(u not in known for u in new)
    assert 0.05 < len(new) / len(ids) < 0.15  # 10 %
    heavy = set(mix.heavy.tolist())
    assert heavy <= known and 0 < len(heavy) < len(known)
    assert sum(u in heavy for u in ids) / len(ids) > 0.2  # 20 % drawn from them, plus their share of the known 70 %
    assert mix.sample(50, seed=4) == mix.sample(50, seed=4)


def test_open_loop_run_sends_at_the_offered_rate_without_errors(target: str, small_sim: Path) -> None:
    ids = UserMix.from_data_dir(small_sim).sample(100, seed=0)
    t = time.perf_counter()
    rep = run_latency(target, qps=50, seconds=2, user_ids=ids, k=10, timeout_s=2.0)
    took = time.perf_counter() - t
    assert rep.sent == 100 and rep.ok == 100 and rep.errors == {} and rep.n_errors == 0
    assert 0 < rep.p50_ms <= rep.p90_ms <= rep.p99_ms <= rep.p999_ms <= rep.max_ms < 2000
    assert len(rep.latencies_ms) == 100
    assert 35 < rep.qps_achieved < 60
    assert took < 10  # bounded: ~2 s of sending plus the tail


def test_latency_is_measured_from_the_intended_send_time() -> None:
    """A server that answers one request at a time in 50 ms, offered 40 req/s: requests queue,
    and the harness must show the queueing (a closed-loop client would report ~50 ms)."""

    class Slow(pb_grpc.RecommenderServicer):
        def Recommend(self, request, context):
            time.sleep(0.05)
            return pb.RecommendResponse(release_id="slow")

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    pb_grpc.add_RecommenderServicer_to_server(Slow(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        rep = run_latency(f"127.0.0.1:{port}", qps=40, seconds=1, user_ids=["1"], timeout_s=5.0, warmup=0)
    finally:
        srv.stop(0)
    assert rep.ok == 40 and rep.n_errors == 0
    assert rep.p50_ms < rep.max_ms
    assert rep.max_ms > 600  # the last request was due at ~1 s and answered at ~2 s
    assert rep.qps_achieved < 25  # the server's capacity, not the offered rate


def test_channels_spread_requests_over_that_many_connections() -> None:
    """A fleet sharing a port is balanced per connection by the kernel: `channels` must mean
    that many TCP connections (gRPC would otherwise share one subchannel), used round-robin."""
    peers: list[str] = []

    class Echo(pb_grpc.RecommenderServicer):
        def Recommend(self, request, context):
            peers.append(context.peer())
            return pb.RecommendResponse(release_id="echo")

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_RecommenderServicer_to_server(Echo(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        rep = run_latency(f"127.0.0.1:{port}", qps=60, seconds=1, user_ids=["1"], timeout_s=5.0, warmup=0, channels=3)
        one = len(peers)
        run_latency(f"127.0.0.1:{port}", qps=30, seconds=1, user_ids=["1"], timeout_s=5.0, warmup=0)
    finally:
        srv.stop(0)
    assert rep.ok == 60 and one == 60
    counts = {p: peers[:one].count(p) for p in set(peers[:one])}
    assert len(counts) == 3 and sorted(counts.values()) == [20, 20, 20]
    assert len(set(peers[one:])) == 1  # the default: one connection
    with pytest.raises(ValueError, match="channels"):
        run_latency(f"127.0.0.1:{port}", qps=10, seconds=1, channels=0)


@pytest.mark.parametrize("bad", ["10.0.0.1:50051", "example.com:50051", "0.0.0.0:50051", "[2001:db8::1]:50051", "192.168.1.5:1"])
def test_non_loopback_targets_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="only target this machine"):
        check_loopback(bad)
    with pytest.raises(ValueError, match="only target this machine"):
        run_latency(bad, qps=10, seconds=1)


@pytest.mark.parametrize("good, norm", [("127.0.0.1:5", "127.0.0.1:5"), ("127.3.2.1:80", "127.3.2.1:80"), ("localhost:9", "localhost:9"),
                                         ("[::1]:7", "[::1]:7"), ("grpc://127.0.0.1:8", "127.0.0.1:8")])
def test_loopback_targets_are_accepted(good: str, norm: str) -> None:
    assert check_loopback(good) == norm


@pytest.mark.parametrize("bad", ["127.0.0.1", "127.0.0.1:x", "127.0.0.1:0", ":50051"])
def test_malformed_targets_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="target"):
        check_loopback(bad)


def _parser() -> argparse.ArgumentParser:
    from parity import cli_bench
    from parity.cli import _nonneg, _positive

    p = argparse.ArgumentParser(prog="parity")
    sub = p.add_subparsers(dest="command", required=True)
    cli_bench.register(sub, _positive, _nonneg)
    return p


def test_cli_prints_a_table_then_json_as_its_last_line(target: str, small_sim: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    args = _parser().parse_args(["bench", "latency", "--target", target, "--qps", "40", "--seconds", "1", "--events", str(small_sim),
                                 "--k", "5", "--out", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("p99") for line in out[:-1])
    last = json.loads(out[-1])
    assert {"qps", "p50_ms", "p99_ms", "errors"} <= set(last)
    assert last["qps"] == 40 and last["errors"] == 0 and last["sent"] == 40
    assert 0 < last["p50_ms"] <= last["p99_ms"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["latencies_ms"]) == 40


def test_cli_refuses_a_remote_target_and_bad_values(capsys: pytest.CaptureFixture) -> None:
    args = _parser().parse_args(["bench", "latency", "--target", "10.1.2.3:50051", "--qps", "10", "--seconds", "1"])
    assert args.func(args) == 2
    assert "only target this machine" in capsys.readouterr().err
    for bad in (["--qps", "0"], ["--qps", "nan"], ["--seconds", "-1"], ["--mix", "70/30"]):
        argv = ["bench", "latency", "--target", "127.0.0.1:1", "--qps", "10", "--seconds", "1", *bad]
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)


def test_cli_reports_an_unreachable_server(capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from bench import latency

    with pytest.raises(ConnectionError, match="cannot reach"):
        latency.run_latency(f"127.0.0.1:{port}", qps=10, seconds=1, connect_timeout_s=0.5)


# Importing locust monkey-patches the standard library with gevent: never in the test process.
_LOCUST_CHECK = textwrap.dedent(
    """
    import json, sys, types
    import bench.locustfile as lf
    from locust.env import Environment
    import grpc
    from parity_api.v1 import recommender_pb2 as pb, recommender_pb2_grpc as pb_grpc

    target, data = sys.argv[1], sys.argv[2]
    fired = []
    fake = types.SimpleNamespace(events=types.SimpleNamespace(request=types.SimpleNamespace(fire=lambda **kw: fired.append(kw))))
    ch = grpc.intercept_channel(grpc.insecure_channel(target), lf.LocustInterceptor(fake))
    stub = pb_grpc.RecommenderStub(ch)
    stub.Recommend(pb.RecommendRequest(user_id="1", k=5), timeout=5)
    try:
        stub.Recommend(pb.RecommendRequest(user_id="not-a-number", k=5), timeout=5)
    except grpc.RpcError as e:
        bad_code = e.code().name
    summary = stub.IngestEvents(iter(lf.Workload(data, seed=1).live_events("1", 3)), timeout=5, metadata=[("authorization", "Bearer locust-token")])
    ch.close()

    env = Environment(user_classes=[lf.ParityGrpcUser], host=target)
    env.parsed_options = types.SimpleNamespace(parity_events=data, parity_user_rps=5.0, parity_timeout=5.0, parity_token="locust-token")
    seen = []
    env.events.request.add_listener(lambda **kw: seen.append((kw["name"], kw["exception"] is None, kw["response_length"])))
    user = lf.ParityGrpcUser(env)
    user.recommend(); user.rank(); user.ingest(); user.on_stop()
    try:
        lf.ParityGrpcUser(Environment(user_classes=[lf.ParityGrpcUser], host="10.0.0.1:50051"))
        remote = "accepted"
    except Exception as e:
        remote = type(e).__name__ + ": " + str(e)
    print(json.dumps({"fired": [{k: (repr(v) if k in ("exception", "response") else v) for k, v in f.items()} for f in fired],
                      "bad_code": bad_code, "ingest": [summary.received, summary.accepted, summary.invalid],
                      "seen": seen, "remote": remote, "wait": user.wait_time()}))
    """
)


def test_locust_user_reports_every_call(target: str, small_sim: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _LOCUST_CHECK, target, str(small_sim)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    ok, bad, ingest = res["fired"]
    assert ok["name"] == "Recommend" and ok["request_type"] == "grpc" and ok["exception"] == "None"
    assert ok["response_length"] > 0 and 0 < ok["response_time"] < 5000
    assert bad["name"] == "Recommend" and "INVALID_ARGUMENT" in bad["exception"] and res["bad_code"] == "INVALID_ARGUMENT"
    assert ingest["name"] == "IngestEvents" and ingest["exception"] == "None"
    assert res["ingest"][0] == 3 and res["ingest"][1] == 3, res["ingest"]  # live events fall in the server's clock window
    assert [(n, ok) for n, ok, _ in res["seen"]] == [("Recommend", True), ("Rank", True), ("IngestEvents", True)]
    assert all(length > 0 for _, _, length in res["seen"])
    assert "only target this machine" in res["remote"]
    assert 0 <= res["wait"] <= 0.2


def test_locust_headless_run_writes_csv(target: str, small_sim: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "locustfile.py"), "--headless", "--host", target, "--users", "4",
           "--spawn-rate", "4", "--run-time", "2s", "--csv", str(tmp_path / "lt"), "--only-summary", "--parity-events", str(small_sim),
           "--parity-token", "locust-token"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (tmp_path / "lt_stats.csv").read_text().splitlines()
    header = rows[0].split(",")
    by_name = {line.split(",")[header.index("Name")]: line.split(",") for line in rows[1:]}
    assert {"Recommend", "Aggregated"} <= set(by_name), r.stderr[-3000:]
    agg = by_name["Aggregated"]
    assert int(agg[header.index("Request Count")]) > 10 and int(agg[header.index("Failure Count")]) == 0


def test_make_loadtest_runs_locust_and_writes_csv_and_a_summary(target: str, small_sim: Path, tmp_path: Path) -> None:
    from bench.loadtest import main as loadtest

    out = tmp_path / "lt"
    rc = loadtest(["--host", target, "--events", str(small_sim), "--users", "4", "--run-time", "3s", "--out", str(out), "--token", "locust-token"])
    assert rc == 0
    assert (tmp_path / "lt_stats.csv").is_file() and (tmp_path / "lt_stats_history.csv").is_file()
    summary = json.loads((tmp_path / "lt_summary.json").read_text())
    rpcs = summary["rpcs"]
    assert rpcs["Aggregated"]["requests"] > 10 and rpcs["Aggregated"]["failures"] == 0
    assert rpcs["Recommend"]["requests"] > rpcs.get("Rank", {"requests": 0})["requests"]  # the task mix: Recommend most
    assert summary["settings"]["users"] == 4 and summary["settings"]["host"] == target
    assert "| Recommend |" in (tmp_path / "lt_summary.md").read_text()
