"""`parity serve --workers N` (server/workers.py): the supervisor's restart and stop rules with
real child processes, the shared port, and a fleet of real servers on a private Redis where a
LoadRelease sent to one worker reaches every worker, a killed worker comes back serving the
fleet's release, and SIGTERM drains them all."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc
from server import workers
from server.workers import Fleet, reserve_port

REPO = Path(__file__).resolve().parents[2]

# A child that counts its starts in a file, fails its first run with `code` and then runs until SIGTERM (exit 0).
CHILD = """
import signal, sys, time, pathlib
p = pathlib.Path(sys.argv[1]); n = int(p.read_text()) + 1 if p.exists() else 1; p.write_text(str(n))
if n == 1 and int(sys.argv[2]):
    sys.exit(int(sys.argv[2]))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    time.sleep(0.05)
"""


def _drive(fleet: Fleet, until, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < end, "the fleet did not get there in time"
        fleet.step(time.monotonic())
        time.sleep(0.02)


def test_a_worker_that_dies_is_started_again_and_sigterm_stops_all(tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "BACKOFF_S", (0.1, 0.2))
    fleet = Fleet.of(lambda i: [sys.executable, "-c", CHILD, str(tmp_path / f"w{i}"), "3" if i == 0 else "0"], 2)
    fleet.start()
    _drive(fleet, lambda: (tmp_path / "w0").exists() and (tmp_path / "w0").read_text() == "2" and fleet.running() == 2)
    assert fleet.workers[0].exit_codes == [3] and fleet.workers[0].restarts == 1 and fleet.workers[1].restarts == 0
    fleet.stop()
    _drive(fleet, lambda: fleet.running() == 0)
    assert [w.exit_codes[-1] for w in fleet.workers] == [0, 0] and fleet.exit_code() == 0


def test_a_worker_that_fails_to_start_stops_the_fleet_with_its_code(tmp_path):
    fleet = Fleet.of(lambda i: [sys.executable, "-c", CHILD, str(tmp_path / f"w{i}"), "2" if i == 1 else "0"], 2)
    fleet.start()
    _drive(fleet, lambda: fleet.stopping and fleet.running() == 0)
    assert fleet.exit_code() == 2 and fleet.workers[1].restarts == 0
    assert (tmp_path / "w1").read_text() == "1"  # never started again


def test_the_reserved_port_is_shared_by_reuseport_sockets_only():
    held = reserve_port("127.0.0.1", 0)
    try:
        port = held.getsockname()[1]
        second = reserve_port("127.0.0.1", port)  # a worker binding with SO_REUSEPORT gets it too
        second.close()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # another program without SO_REUSEPORT does not
    finally:
        held.close()


# -- a fleet of real servers on a private Redis ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int, avoid: int = 0) -> int:
    """A port p with p .. p + n - 1 all free now (a fleet's metrics ports are consecutive).
    CI once lost a run to p + 1 being taken: worker 2 could not serve its metrics and the
    supervisor stopped the fleet."""
    for _ in range(200):
        p = _free_port()
        if avoid in range(p, p + n) or p + n > 65535:
            continue
        held = []
        try:
            for q in range(p, p + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


def _status(port: int, token: str) -> pb.StatusResponse:
    """GetStatus on a new connection (the kernel picks the worker per connection)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        return pb_grpc.AdminStub(ch).GetStatus(pb.GetStatusRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=10)


def _each_worker(port: int, token: str, n: int, want=lambda st: True, timeout_s: float = 60.0) -> dict[int, pb.StatusResponse]:
    """The latest status of every worker 1..n, once each satisfies `want` (fresh connections until then)."""
    seen: dict[int, pb.StatusResponse] = {}
    end = time.monotonic() + timeout_s
    while True:
        try:
            st = _status(port, token)
            seen[st.worker] = st
        except grpc.RpcError:
            pass  # a worker still starting or restarting
        if set(seen) == set(range(1, n + 1)) and all(want(s) for s in seen.values()):
            return seen
        assert time.monotonic() < end, f"workers seen: { {w: (s.release_id, s.pid) for w, s in seen.items()} }"
        time.sleep(0.05)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_a_fleet_shares_one_port_and_a_load_release_reaches_every_worker(release_dir, small_sim, redis_url, admin_token, tmp_path):
    from bench.canary_releases import derive
    from export.release import load_release

    root = tmp_path / "releases"
    root.mkdir()
    primary = root / release_dir.name
    shutil.copytree(release_dir, primary)
    other = derive(load_release(primary), root, "good").release_id
    port = _free_port()
    metrics = _free_ports(2, avoid=port)
    argv = [sys.executable, "-m", "parity", "serve", "--workers", "2", "--release", str(primary), "--events", str(small_sim),
            "--store", redis_url, "--namespace", "fleet", "--port", str(port), "--metrics-port", str(metrics),
            "--admin-token", admin_token, "--releases-root", str(root), "--drain-grace", "2"]
    log = (tmp_path / "fleet.log").open("wb")
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        first = _each_worker(port, admin_token, 2, lambda st: st.serving, timeout_s=180)
        assert {st.release_id for st in first.values()} == {release_dir.name}
        assert len({st.pid for st in first.values()}) == 2 and proc.pid not in {st.pid for st in first.values()}
        for i in (0, 1):  # one metrics endpoint per worker
            assert f'parity_release_info{{release_id="{release_dir.name}"}} 1.0' in _metrics(metrics + i)

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = pb_grpc.AdminStub(ch).LoadRelease(pb.LoadReleaseRequest(path=other), metadata=[("authorization", f"Bearer {admin_token}")],
                                                  timeout=60)
        assert r.release_id == other
        swapped = _each_worker(port, admin_token, 2, lambda st: st.release_id == other, timeout_s=60)
        for i in (0, 1):
            text = _metrics(metrics + i)
            assert f'parity_release_info{{release_id="{other}"}} 1.0' in text and f'release_id="{release_dir.name}"' not in text

        os.kill(swapped[1].pid, signal.SIGKILL)  # the supervisor starts worker 1 again: it serves the fleet's release, not its flag
        back = _each_worker(port, admin_token, 2, lambda st: st.release_id == other and st.pid != swapped[1].pid
                            if st.worker == 1 else True, timeout_s=180)
        assert back[1].pid != swapped[1].pid and back[2].pid == swapped[2].pid

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        for st in back.values():
            with pytest.raises(ProcessLookupError):
                os.kill(st.pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "fleet.log").read_text(errors="replace")
    assert "2 workers on 127.0.0.1" in text and "worker 1 exited with code -9" in text, text[-3000:]


def test_a_fleet_that_cannot_start_exits_2(small_sim, tmp_path):
    argv = [sys.executable, "-m", "parity", "serve", "--workers", "2", "--release", str(tmp_path / "no-such-release"),
            "--events", str(small_sim), "--port", "0", "--metrics-port", "0"]
    p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "no-such-release" in p.stderr and "memory store share nothing" in p.stderr


def test_worker_argv_rebuilds_the_fleet_arguments():
    import argparse

    from parity.cli_serve import add_serve_arguments, worker_argv

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args(["--release", "r", "--events", "d", "--workers", "3", "--no-caches", "--modes", "user_activity=on_read"])
    argv = worker_argv(args, port=1234, reuse_port=True, worker_index=2)
    back = p.parse_args(argv[argv.index("serve") + 1:])
    assert back.port == 1234 and back.reuse_port and back.worker_index == 2 and back.workers == 1
    assert back.no_caches and back.modes == "user_activity=on_read" and back.release == "r" and back.events == "d"
    assert json.dumps(vars(back), default=str)  # every value survived as text


def test_workers_die_with_a_killed_supervisor(small_sim, release_dir, tmp_path):
    """A supervisor killed with SIGKILL (no chance to forward anything) must not leave workers
    holding the port: each worker gets SIGTERM from the kernel when its parent dies."""
    port = _free_port()
    argv = [sys.executable, "-m", "parity", "serve", "--workers", "2", "--release", str(release_dir), "--events", str(small_sim),
            "--port", str(port), "--metrics-port", "0", "--admin-token", "t", "--drain-grace", "1"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pids = {st.pid for st in _each_worker(port, "t", 2, lambda st: st.serving, timeout_s=180).values()}
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
