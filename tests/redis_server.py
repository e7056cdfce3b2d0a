"""A private, throwaway redis-server for tests.

Tests never touch a shared Redis (127.0.0.1:6379 may hold someone's data): each session
starts its own server on a free port, without persistence, in a temporary directory.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Sequence

import pytest

__all__ = ["RedisServer", "RedisClusterServers", "raw_client", "redis_required", "require_redis_server_binary"]

START_TIMEOUT_S = 10.0


def redis_required() -> bool:
    """CI must run the Redis tests, so a missing binary fails there instead of skipping."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("PARITY_REQUIRE_REDIS") == "1"


def require_redis_server_binary(binary: str = "redis-server") -> str:
    """Path of redis-server; skip (locally) or fail (CI / PARITY_REQUIRE_REDIS=1) without it."""
    path = shutil.which(binary)
    if path is None:
        if redis_required():
            pytest.fail(
                f"{binary} not found on PATH but CI=true or PARITY_REQUIRE_REDIS=1 requires it "
                "(install it, e.g. apt-get install redis-server)",
                pytrace=False,
            )
        pytest.skip("redis-server not installed")
    return path


def _free_port() -> int:
    # The port is released before redis binds it; a clash is unlikely and surfaces as a
    # start failure with the server's log, not as a silent connection to something else.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int, timeout_s: float = 0.5) -> bool:
    """Raw RESP PING, so the helper does not depend on the client library under test."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _send(port: int, *args: bytes, timeout_s: float = 2.0) -> bytes:
    payload = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(payload)
            return sock.recv(1024)
    except OSError:  # server already gone, or SHUTDOWN closed the socket without a reply
        return b""


class RedisServer:
    """A redis-server child process bound to 127.0.0.1 on a free port."""

    def __init__(self, binary: str = "redis-server", extra_args: Sequence[str] = ()) -> None:
        """extra_args are appended to the command line (e.g. cluster mode for one test)."""
        self.binary = binary
        self.extra_args = list(extra_args)
        self.port: int = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._keep_port: int | None = None
        self._bus_port: int | None = None

    @property
    def url(self) -> str:
        if self._proc is None:
            raise RuntimeError("RedisServer is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        if self._proc is not None:
            return self
        path = require_redis_server_binary(self.binary)
        if self._dir is None:  # kill() keeps it, so revive() finds its cluster config again
            self._dir = tempfile.TemporaryDirectory(prefix="parity-redis-")
        self.port = self._keep_port or _free_port()
        log_path = Path(self._dir.name) / "redis.log"
        cmd = [
            path,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--logfile", str(log_path),
            "--daemonize", "no",
            *self.extra_args,
        ]
        if "--cluster-enabled" in self.extra_args and "--cluster-port" not in self.extra_args:
            # The bus port defaults to port + 10000, which does not exist for ports > 55535.
            self._bus_port = self._bus_port or _free_port()
            cmd += ["--cluster-port", str(self._bus_port)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if _ping(self.port):
                return self
            time.sleep(0.02)
        exited = self._proc.poll()
        log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        stderr = self._proc.stderr.read().decode(errors="replace")[-2000:] if exited is not None and self._proc.stderr else ""
        self.stop()
        state = f"exited with code {exited}" if exited is not None else f"did not answer PING within {START_TIMEOUT_S:.0f} s"
        raise RuntimeError(f"private redis-server on port {self.port} {state}\nstderr: {stderr}\nlog: {log}")

    def stop(self) -> None:
        self._bus_port = None
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                _send(self.port, b"SHUTDOWN", b"NOSAVE")
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def kill(self) -> None:
        """SIGKILL, as a crashed machine: no shutdown, no final write. Its directory (and a
        cluster node's nodes.conf) stays for revive()."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()

    def revive(self) -> "RedisServer":
        """Start again after kill(), on the same ports and directory (no data: no persistence)."""
        self._keep_port = self.port
        try:
            return self.start()
        finally:
            self._keep_port = None

    def restart_empty(self) -> "RedisServer":
        """Stop and start again on the same port, with no data (as a Redis without persistence does)."""
        port = self.port
        self.stop()
        self._keep_port = port
        try:
            return self.start()
        finally:
            self._keep_port = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisClusterServers:
    """A private Redis Cluster of 3 masters and 3 replicas: six redis-server children on free
    ports, each in its own directory, joined by hand (CLUSTER MEET / ADDSLOTSRANGE / REPLICATE)
    so nothing depends on redis-cli's port conventions.

    Failover is quick on purpose (cluster-node-timeout 1000 ms, any replica may be promoted)
    and a dead master stops only its own slots (cluster-require-full-coverage no), the
    settings a cluster that must keep serving through a node loss would use.
    """

    N_MASTERS = 3
    NODE_TIMEOUT_MS = 1000

    def __init__(self, binary: str = "redis-server") -> None:
        self.binary = binary
        self.nodes: list[RedisServer] = []

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        """The spec string of a store on this cluster (features.online.registry)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> "RedisClusterServers":
        import redis  # the admin client; the store under test builds its own

        require_redis_server_binary(self.binary)
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS),
            "--cluster-replica-validity-factor", "0",
            "--cluster-require-full-coverage", "no",
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
        ]
        try:
            for _ in range(2 * self.N_MASTERS):
                self.nodes.append(RedisServer(self.binary, extra_args=args).start())
            admins = [redis.Redis(port=p, socket_timeout=5) for p in self.ports]
            try:
                self._join(admins)
            finally:
                for a in admins:
                    a.close()
        except BaseException:
            self.stop()
            raise
        return self

    def _join(self, admins: list) -> None:
        ids = [a.execute_command("CLUSTER", "MYID").decode() for a in admins]
        bus = [int(a.config_get("cluster-port")["cluster-port"]) or p + 10000 for a, p in zip(admins, self.ports)]
        for port, bport in zip(self.ports[1:], bus[1:]):
            admins[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port, bport)
        step = 16384 // self.N_MASTERS
        for i in range(self.N_MASTERS):
            last = 16383 if i == self.N_MASTERS - 1 else (i + 1) * step - 1
            admins[i].execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
        self._wait(lambda: all(len(a.execute_command("CLUSTER", "NODES").splitlines()) == len(admins) for a in admins), "every node to know the others")
        for i in range(self.N_MASTERS):
            replica = admins[self.N_MASTERS + i]
            self._wait(lambda: _try(replica.execute_command, "CLUSTER", "REPLICATE", ids[i]), f"node {ids[i]} to be a master its replica can follow")
        self.wait_healthy()

    def wait_healthy(self, timeout_s: float = 20.0) -> None:
        """Until every live node says cluster_state:ok, N_MASTERS nodes serve slots and each of
        them has a replica whose link is up and in sync."""
        import redis

        def ok() -> bool:
            masters = 0
            for p in self.live_ports():
                with redis.Redis(port=p, socket_timeout=1) as a:
                    if b"cluster_state:ok" not in a.execute_command("CLUSTER", "INFO"):
                        return False
                    info = a.info("replication")
                    if _owns_slots(a):
                        masters += 1
                        if info.get("connected_slaves", 0) < 1 or info["slave0"]["state"] != "online":
                            return False
                    elif info["role"] == "slave" and (info.get("master_link_status") != "up" or info.get("master_sync_in_progress")):
                        return False
            return masters == self.N_MASTERS

        self._wait(ok, "cluster_state:ok with every master replicated", timeout_s)

    def live_ports(self) -> list[int]:
        return [n.port for n in self.nodes if n._proc is not None and n._proc.poll() is None]

    def masters(self) -> list[int]:
        """Ports of the live nodes that serve slots (as this node itself sees it)."""
        import redis

        out = []
        for p in self.live_ports():
            with redis.Redis(port=p, socket_timeout=1) as a:
                if _owns_slots(a):
                    out.append(p)
        return out

    def replica_of(self, master_port: int) -> int:
        """Port of the live replica that follows the master on `master_port`."""
        import redis

        for p in self.live_ports():
            with redis.Redis(port=p, socket_timeout=1) as a:
                info = a.info("replication")
                if info["role"] == "slave" and int(info["master_port"]) == master_port:
                    return p
        raise LookupError(f"no live replica follows the master on port {master_port}")

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    @staticmethod
    def _wait(cond, what: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if cond():
                    return
            except OSError:
                pass
            except Exception as exc:  # a node still loading answers with an error reply
                if type(exc).__module__.split(".")[0] != "redis":
                    raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster: timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        self.nodes = []

    def __enter__(self) -> "RedisClusterServers":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _try(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "redis":
            raise
        return False


def _owns_slots(admin) -> bool:
    """Whether this node is a master serving slots, by its own line of CLUSTER NODES."""
    for line in admin.execute_command("CLUSTER", "NODES").decode().splitlines():
        f = line.split()
        if "myself" in f[2]:
            return "master" in f[2] and len(f) > 8
    return False


def raw_client(url: str):
    """A plain redis-py client for a store's url, to inspect raw keys: redis.Redis for
    redis:// and rediss://, RedisCluster for redis+cluster:// and rediss+cluster://."""
    import redis
    from redis.cluster import RedisCluster

    scheme, rest = url.split("://", 1)
    if scheme.endswith("+cluster"):
        return RedisCluster.from_url(scheme[: -len("+cluster")] + "://" + rest)
    return redis.Redis.from_url(url)
