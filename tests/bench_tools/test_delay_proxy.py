"""The fault-injecting proxy (bench/delay_proxy.py) in front of a tiny echo upstream
(bench/echo_upstream.py): bytes pass untouched, delays and drops happen as planned and
reproducibly, deadlines and metadata reach the upstream, upstream errors come back as they were."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from bench.delay_proxy import DelayProxy, FaultPlan, main as proxy_main
from bench.echo_upstream import EchoUpstream

REPO = Path(__file__).resolve().parents[2]
ECHO = "/echo.Echo/Echo"


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as up:
        yield up


def _call(channel: grpc.Channel, payload: bytes, timeout: float = 2.0, method: str = ECHO, metadata=None) -> bytes:
    return channel.unary_unary(method)(payload, timeout=timeout, metadata=metadata)


def _timed(channel: grpc.Channel, payload: bytes, timeout: float = 2.0) -> tuple[float, grpc.StatusCode]:
    t = time.perf_counter()
    try:
        _call(channel, payload, timeout)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    return time.perf_counter() - t, code


def _wait(pred, timeout_s: float = 2.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_plan_is_validated_and_reproducible() -> None:
    with pytest.raises(ValueError):
        FaultPlan(delay_share=0.8, drop_share=0.3)
    with pytest.raises(ValueError):
        FaultPlan(drop_share=-0.1)
    with pytest.raises(ValueError):
        FaultPlan(delay_ms=(200.0, 80.0))
    a, b = FaultPlan(seed=7).outcomes(200), FaultPlan(seed=7).outcomes(200)
    assert a == b and a != FaultPlan(seed=8).outcomes(200)
    assert all(0.08 <= d <= 0.2 for o, d in a if o == "delayed")
    assert all(d == 0.0 for o, d in a if o != "delayed")
    # the outcomes do not depend on the delay range (two draws per call whatever happens)
    assert [o for o, _ in FaultPlan(seed=7, delay_ms=(1.0, 2.0)).outcomes(200)] == [o for o, _ in a]


def test_no_faults_every_call_passes_with_identical_bytes(upstream: EchoUpstream) -> None:
    payloads = [os.urandom(n) for n in (0, 1, 17, 4096, 1 << 20)] + [bytes(range(256)) * 3]
    with DelayProxy(upstream.target, FaultPlan(delay_share=0.0, drop_share=0.0)) as p, grpc.insecure_channel(p.target) as ch:
        assert p.target.startswith("127.0.0.1:") and p.port > 0
        for data in payloads:
            assert _call(ch, data) == data
        # a second method goes through the same generic handler
        assert _call(ch, b"x", method="/other.Svc/Method") == b"x"
        c = p.counts
    assert c == {"calls": len(payloads) + 1, "forwarded": len(payloads) + 1, "delayed": 0, "dropped": 0, "upstream_error": 0}


def test_delay_share_one_delays_every_call_by_at_least_80_ms(upstream: EchoUpstream) -> None:
    with DelayProxy(upstream.target, FaultPlan(delay_share=1.0, drop_share=0.0, seed=3)) as p, grpc.insecure_channel(p.target) as ch:
        took = [_timed(ch, b"d") for _ in range(8)]
        assert all(code == grpc.StatusCode.OK for _, code in took)
        assert all(0.080 <= t < 0.200 + 0.150 for t, _ in took), took
        assert p.counts["delayed"] == 8 == p.counts["calls"]


def test_drop_share_one_fails_with_deadline_exceeded_at_the_clients_deadline(upstream: EchoUpstream) -> None:
    deadline = 0.3
    n_up = len(upstream.seen)
    with DelayProxy(upstream.target, FaultPlan(delay_share=0.0, drop_share=1.0)) as p, grpc.insecure_channel(p.target) as ch:
        # concurrent drops: held on the proxy's loop, none blocks another
        with futures.ThreadPoolExecutor(6) as pool:
            took = list(pool.map(lambda _: _timed(ch, b"x", timeout=deadline), range(6)))
        assert all(code == grpc.StatusCode.DEADLINE_EXCEEDED for _, code in took), took
        assert all(deadline - 0.01 <= t < deadline + 0.25 for t, _ in took), took
        assert p.counts["dropped"] == 6
        assert _wait(lambda: p.held == 0), "held calls not released after their deadline"
        assert len(upstream.seen) == n_up  # never forwarded
        # a call with no deadline is held until the client gives up (here: cancels)
        fut = ch.unary_unary(ECHO).future(b"forever")
        assert _wait(lambda: p.held == 1)
        fut.cancel()
        assert _wait(lambda: p.held == 0)
        # and one still held when the proxy stops is let go (the client sees an error, not a hang)
        fut = ch.unary_unary(ECHO).future(b"forever")
        assert _wait(lambda: p.held == 1)
    with pytest.raises(grpc.RpcError):
        fut.result(timeout=5)
    assert p.held == 0


def test_mixed_plan_shares_are_within_binomial_bounds_and_counts_add_up(upstream: EchoUpstream) -> None:
    n, plan = 400, FaultPlan(delay_share=0.2, drop_share=0.05, delay_ms=(80.0, 200.0), seed=11)
    deadline = 1.0  # well past the longest delay, so only the dropped calls fail even on a busy machine
    with DelayProxy(upstream.target, plan) as p, grpc.insecure_channel(p.target) as ch:
        with futures.ThreadPoolExecutor(32) as pool:
            took = list(pool.map(lambda i: _timed(ch, str(i).encode(), timeout=deadline), range(n)))
        c = p.counts
    assert c["calls"] == n == c["forwarded"] + c["delayed"] + c["dropped"]
    assert c["upstream_error"] == 0
    # exactly what the plan says for its first n calls, whatever the arrival order
    expected = [o for o, _ in plan.outcomes(n)]
    assert (c["forwarded"], c["delayed"], c["dropped"]) == (expected.count("forwarded"), expected.count("delayed"), expected.count("dropped"))
    for key, share in (("delayed", 0.2), ("dropped", 0.05)):
        sd = math.sqrt(n * share * (1 - share))
        assert abs(c[key] - n * share) <= 4 * sd, (key, c[key])
    # clients saw it: the dropped ones failed at the deadline, nothing else failed
    failed = [t for t, code in took if code != grpc.StatusCode.OK]
    assert len(failed) == c["dropped"]
    assert all(code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED) for _, code in took)
    slow_ok = sum(1 for t, code in took if code == grpc.StatusCode.OK and t >= 0.080)
    assert slow_ok >= c["delayed"]  # every delayed call took >= 80 ms (others may too, on a busy machine)


def test_deadline_and_metadata_reach_the_upstream(upstream: EchoUpstream) -> None:
    md = (("x-tenant", "t1"), ("authorization", "Bearer abc"), ("trace-bin", b"\x00\xff\x01"))
    with DelayProxy(upstream.target, FaultPlan(delay_share=1.0, drop_share=0.0, delay_ms=(100.0, 100.0))) as p, \
            grpc.insecure_channel(p.target) as ch:
        before = len(upstream.seen)
        assert _call(ch, b"m", timeout=1.5, metadata=md) == b"m"
        seen = upstream.seen[before]
        assert seen.method == ECHO
        for pair in md:
            assert pair in seen.metadata
        assert not any(k.startswith("grpc-") for k, _ in seen.metadata)
        # the upstream's deadline is the client's, less what the proxy spent (the 100 ms delay)
        assert seen.time_remaining is not None and seen.time_remaining <= 1.5 - 0.1 + 0.01
        assert seen.time_remaining > 1.0
        # no deadline on the client: none upstream
        before = len(upstream.seen)
        assert ch.unary_unary(ECHO)(b"n") == b"n"
        assert upstream.seen[before].time_remaining is None


def test_upstream_errors_come_back_unchanged_and_are_counted(upstream: EchoUpstream) -> None:
    with DelayProxy(upstream.target, FaultPlan(delay_share=0.0, drop_share=0.0)) as p, grpc.insecure_channel(p.target) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _call(ch, b"NOT_FOUND", method="/echo.Echo/Fail")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == "failed on purpose"
        assert ("echo-fail", "yes") in tuple(err.value.trailing_metadata())
        # the upstream runs out of the client's deadline: DEADLINE_EXCEEDED, counted as an upstream error
        t = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            _call(ch, b"2.0", method="/echo.Echo/Sleep", timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.perf_counter() - t < 1.0
        # streaming methods of known services are refused
        with pytest.raises(grpc.RpcError) as err:
            ch.stream_unary("/parity.v1.Recommender/IngestEvents")(iter([b""]), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert _wait(lambda: p.counts["upstream_error"] == 2)
        assert p.counts["forwarded"] == 2


def test_upstream_down_is_unavailable_not_a_hang() -> None:
    with EchoUpstream() as gone:
        target = gone.target
    with DelayProxy(target, FaultPlan(delay_share=0.0, drop_share=0.0)) as p, grpc.insecure_channel(p.target) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _call(ch, b"x", timeout=1.0)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert p.counts["upstream_error"] == 1


def test_bad_flags_are_refused() -> None:
    assert proxy_main(["--upstream", "127.0.0.1:1", "--delay-share", "0.9", "--drop-share", "0.2"]) == 2
    with pytest.raises(SystemExit):
        proxy_main(["--upstream", "127.0.0.1:1", "--delay-ms", "80"])


def test_cli_serves_until_sigterm(upstream: EchoUpstream) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "bench.delay_proxy", "--upstream", upstream.target, "--port", "0",
                             "--delay-share", "0", "--drop-share", "0", "--seed", "5"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("delay_proxy: 127.0.0.1:"), line
        target = line.split()[1]
        with grpc.insecure_channel(target) as ch:
            assert _call(ch, b"cli", timeout=5.0) == b"cli"
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0 and "'forwarded': 1" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
