"""The server process: SIGTERM drains (health NOT_SERVING, the RPC in flight finishes, exit 0),
TLS, and start-up errors that say what is wrong."""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc
from server.client import ParityClient

ROOT = Path(__file__).resolve().parents[2]


def _start(release_dir: Path, data_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "parity", "serve", "--release", str(release_dir), "--events", str(data_dir), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "0", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_serving(port: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise AssertionError("server did not become SERVING")


def test_sigterm_drains_in_flight_requests_and_exits_zero(release_dir, small_sim, free_port):
    port = free_port()
    proc = _start(release_dir, small_sim, port, "--drain-notice", "1.0", "--drain-grace", "10", "--ingest-token", "T")
    try:
        _wait_serving(port, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            # An RPC in flight across the SIGTERM: a client stream left open until after the signal.
            release = threading.Event()

            def events():
                yield pb.Event(event_id="77000000001", ts_ms=1, user_id="1", item_id="1", type="impression", value=1)
                release.wait(20)
                yield pb.Event(event_id="77000000002", ts_ms=1, user_id="1", item_id="1", type="impression", value=1)

            stub = pb_grpc.RecommenderStub(ch)
            fut = stub.IngestEvents.future(events(), timeout=30, metadata=[("authorization", "Bearer T")])
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            time.sleep(1.5)  # past the notice: the server now refuses new RPCs but waits for ours
            assert proc.poll() is None, "exited with a request in flight"
            release.set()
            summary = fut.result(timeout=20)
            assert summary.received == 2
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_startup_errors_name_the_problem_and_exit_2(release_dir, small_sim, tmp_path):
    from parity.cli import _nonneg, _positive
    from parity.cli_serve import register

    p = argparse.ArgumentParser(prog="parity")
    register(p.add_subparsers(dest="command", required=True), _positive, _nonneg)
    args = p.parse_args(["serve", "--release", str(tmp_path / "none"), "--events", str(small_sim), "--port", "0", "--metrics-port", "0"])
    assert args.func(args) == 2
    args = p.parse_args(["serve", "--release", str(release_dir), "--events", str(tmp_path), "--port", "0", "--metrics-port", "0"])
    assert args.func(args) == 2
    args = p.parse_args(["serve", "--release", str(release_dir), "--events", str(small_sim), "--tls-cert", str(tmp_path / "c.pem")])
    assert args.func(args) == 2
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--release", "r", "--events", "e", "--port", "-1"])


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for localhost, made by the openssl command line."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("TLS test needs the openssl command to make a certificate")
    c, k = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(k), "-out", str(c), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    return c, k


def test_tls_when_a_certificate_and_key_are_given(release_dir, small_sim, tmp_path, server_config):
    cert, key = _self_signed(tmp_path)
    from server.app import BackgroundServer

    with BackgroundServer(server_config(release_dir, small_sim, tls_cert=cert, tls_key=key)) as s:
        with ParityClient(f"127.0.0.1:{s.port}", root_certificates=cert.read_bytes(), server_name="localhost", timeout_s=5) as c:
            assert len(c.recommend(1, k=3).items) == 3
        with ParityClient(f"127.0.0.1:{s.port}", timeout_s=1, retries=0) as plain:
            with pytest.raises(Exception):
                plain.recommend(1, k=3)
