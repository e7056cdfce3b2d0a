"""`parity serve --workers N`: N server processes on one port, because one Python process
serves on one core (the GIL) and a host has more.

Why a supervisor and SO_REUSEPORT rather than one process forking after it bound the socket:
grpc.aio cannot be forked once its core has started, and each worker must build its own
release snapshot, caches and event loop anyway. So the supervisor only holds the ports and the
children:

- It binds each port first with SO_REUSEPORT and keeps that socket (never listening) for the
  fleet's life: port 0 resolves to one free port that every worker then shares, and a port
  held by another program fails here, before any worker starts. Each worker binds the same
  port with SO_REUSEPORT (`ServerConfig.reuse_port`) and the kernel spreads connections over
  the listening workers.
- Every worker is a `parity serve` process with the fleet's own arguments; worker i serves its
  Prometheus metrics on `--metrics-port` + i (one scrape per worker, labelled by the scrape
  target), and says which worker it is in GetStatus.
- What workers must agree on lives in the online store, not here: the rollout (arms, canary,
  shadow, the guard's windows) and the primary release, which a LoadRelease on any worker
  records there and every other worker's poll loads (server/rollout_manager.py). Before it
  starts the workers, the supervisor records its `--release` as the fleet's primary, so a
  worker restarted later serves what the fleet serves, not a stale flag. With the memory store
  nothing is shared: each worker fills its own store from the event log, and ingest, rollouts
  and LoadRelease reach only the worker that received them (said at start-up).
- SIGTERM / SIGINT reach every worker, which drain as a lone server does; the supervisor exits
  0 when all exited 0. A worker that dies is started again (backoff 1 s doubling to 30 s); a
  worker that fails during start-up (exit code 2: a bad flag, a refused release) stops the
  fleet with that code instead of restarting in a loop.
"""
from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Fleet", "WorkerProc", "reserve_port", "run_fleet"]

log = logging.getLogger(__name__)

STARTUP_S = 60.0  # a worker that exits with code 2 sooner than this after its start failed to start
BACKOFF_S = (1.0, 30.0)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never listening socket with SO_REUSEPORT on (host, port): keeps the port for the
    workers (port 0: a free one). OSError when the port is taken by a socket without SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host.strip("[]"), port))
    except OSError:
        s.close()
        raise
    return s


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the supervisor dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so a killed supervisor never leaves workers holding the port."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass  # not Linux: the supervisor's own SIGTERM handling still stops them


@dataclass
class WorkerProc:
    index: int
    argv: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    next_start: float = 0.0  # monotonic time of the next start after a crash
    exit_codes: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.started = time.monotonic()
        log.info("worker %d started (pid %d)", self.index + 1, self.proc.pid)


@dataclass
class Fleet:
    """The children of one supervisor; `step` is one turn of its loop (tests drive it too)."""

    workers: list[WorkerProc]
    stopping: bool = False
    failed: int | None = None  # the start-up exit code that stops the fleet

    @classmethod
    def of(cls, argv_for: Callable[[int], list[str]], n: int) -> Fleet:
        return cls([WorkerProc(i, argv_for(i)) for i in range(n)])

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                try:
                    w.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.signal_all(signal.SIGTERM)

    def step(self, now: float) -> None:
        for w in self.workers:
            if w.proc is None:
                if not self.stopping and now >= w.next_start:
                    w.start()
                continue
            rc = w.proc.poll()
            if rc is None:
                continue
            w.exit_codes.append(rc)
            w.proc = None
            if self.stopping:
                continue
            if rc == 2 and now - w.started < STARTUP_S:
                log.error("worker %d failed to start (exit code 2): stopping the fleet", w.index + 1)
                self.failed = 2
                self.stop()
                continue
            delay = min(BACKOFF_S[0] * 2 ** w.restarts, BACKOFF_S[1])
            w.restarts += 1
            w.next_start = now + delay
            log.warning("worker %d exited with code %d; starting it again in %.0f s", w.index + 1, rc, delay)

    def running(self) -> int:
        return sum(w.proc is not None for w in self.workers)

    def exit_code(self) -> int:
        if self.failed is not None:
            return self.failed
        last = [w.exit_codes[-1] if w.exit_codes else 0 for w in self.workers]
        return 0 if all(rc == 0 for rc in last) else 1


def run_fleet(argv_for: Callable[[int], list[str]], n: int, reserved: Sequence[socket.socket], *, kill_after_s: float,
              announce: Callable[[list[int]], None] | None = None, tick_s: float = 0.2) -> int:
    """Start `n` workers, restart the ones that die, forward SIGTERM/SIGINT, wait for all to exit.
    `reserved` sockets are held until every worker has exited. Returns the fleet's exit code."""
    fleet = Fleet.of(argv_for, n)
    prev = {sig: signal.signal(sig, lambda *_: fleet.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        fleet.start()
        if announce is not None:
            announce([w.proc.pid for w in fleet.workers if w.proc is not None])
        deadline = None
        while True:
            fleet.step(time.monotonic())
            if fleet.stopping:
                if fleet.running() == 0:
                    break
                deadline = deadline or time.monotonic() + kill_after_s
                if time.monotonic() > deadline:
                    log.error("workers still running %.0f s after SIGTERM: killing them", kill_after_s)
                    fleet.signal_all(signal.SIGKILL)
            time.sleep(tick_s)
        return fleet.exit_code()
    finally:
        for sig, h in prev.items():
            signal.signal(sig, h)
        fleet.signal_all(signal.SIGKILL)  # only if we got here by an exception
        for s in reserved:
            s.close()

