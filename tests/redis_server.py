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

__all__ = ["RedisServer", "redis_required", "require_redis_server_binary"]

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

    @property
    def url(self) -> str:
        if self._proc is None:
            raise RuntimeError("RedisServer is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        if self._proc is not None:
            return self
        path = require_redis_server_binary(self.binary)
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
            cmd += ["--cluster-port", str(_free_port())]
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
