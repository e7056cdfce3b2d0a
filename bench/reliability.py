"""Overload benchmark: goodput and accepted-request latency far past capacity, and recovery.

    python -m bench.reliability --out bench/results/reliability.json [--quick] [--stores memory,redis]

For each store: start `parity serve` (the product, default settings) as a child process, find
its capacity (the highest rate with p99 <= 50 ms and no errors; bench/serving.py's search), then
offer 1x, 2x, 5x and 10x that rate with the open-loop harness (bench/latency.py: latency from
each request's intended send time) and record goodput (OK answers per second), the p99 of the
OK answers and every error code; while the 10x run goes on, a side thread checks health every
200 ms on the main port and on the ops port (`--ops-port`) and Recommend latency of a
well-behaved client is not separated: every client is treated alike. Right after the 10x run,
1x is offered again in 0.5 s windows: the time to recover is when the first window with p99
<= 50 ms and no errors starts, counted from the end of the overload.

The server is pinned to CPU 0 and this load generator to CPU 1 (when the machine has two or
more): at 10x the generator needs most of a core by itself, and unpinned it would take that
core from the server it measures. The server's own metrics are scraped at the end (admission
outcomes per lane, status codes), so every refusal Python made is accounted for; calls gRPC's
C core dropped before Python saw them reach the client as CANCELLED (server/admission.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

from bench.report import machine, write_json
from bench.serving import ServerProcess, ServingBenchConfig, _prepare, capacity_search

__all__ = ["ReliabilityConfig", "run", "main", "recovery_s"]

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ReliabilityConfig:
    multiples: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)
    seconds: float = 20.0  # each multiple
    recovery_seconds: float = 10.0
    recovery_window_s: float = 0.5
    recovery_fraction: float = 0.5  # of capacity: clear of the edge, so what is measured is the overload's after-effect
    capacity: ServingBenchConfig = field(default_factory=lambda: ServingBenchConfig(step_seconds=10.0, warmup_seconds=10.0))
    stores: tuple[str, ...] = ("memory",)
    pin: bool = True
    timeout_s: float = 1.0
    server_args: tuple[str, ...] = ()  # extra `parity serve` options (admission settings under study)

    @classmethod
    def quick(cls) -> "ReliabilityConfig":
        cap = replace(ServingBenchConfig.quick(), ladder_start=100, ladder_max=400)
        return cls(seconds=3.0, recovery_seconds=3.0, capacity=cap)


def _say(msg: str) -> None:
    print(f"[reliability] {msg}", file=sys.stderr, flush=True)


def recovery_s(windows: Sequence[dict], window_s: float, p99_limit_ms: float = 50.0) -> float | None:
    """Start of the first window (s) from which every later window has p99 <= limit and no errors."""
    ok = [w["errors"] == 0 and w["ok"] > 0 and w["p99_ms"] is not None and w["p99_ms"] <= p99_limit_ms for w in windows]
    for i in range(len(ok)):
        if all(ok[i:]):
            return round(i * window_s, 3)
    return None


class HealthProbe:
    """grpc.health.v1 Check every `every_s` on each target, in a thread: latency and failures."""

    def __init__(self, targets: dict[str, str], every_s: float = 0.2, timeout_s: float = 1.0) -> None:
        self.targets, self.every_s, self.timeout_s = targets, every_s, timeout_s
        self.samples: dict[str, list[float]] = {k: [] for k in targets}
        self.failures: dict[str, int] = {k: 0 for k in targets}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        chans = {k: grpc.insecure_channel(t) for k, t in self.targets.items()}
        stubs = {k: health_pb2_grpc.HealthStub(c) for k, c in chans.items()}
        while not self._stop.is_set():
            for k, stub in stubs.items():
                t = time.perf_counter()
                try:
                    ok = stub.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout_s).status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    ok = False
                if ok:
                    self.samples[k].append((time.perf_counter() - t) * 1000)
                else:
                    self.failures[k] += 1
            self._stop.wait(self.every_s)
        for c in chans.values():
            c.close()

    def __enter__(self) -> "HealthProbe":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(5)

    def summary(self) -> dict:
        import numpy as np

        out = {}
        for k, s in self.samples.items():
            a = np.asarray(s)
            out[k] = {"checks": len(s) + self.failures[k], "failed": self.failures[k],
                      "p50_ms": round(float(np.percentile(a, 50)), 2) if len(a) else None,
                      "p99_ms": round(float(np.percentile(a, 99)), 2) if len(a) else None,
                      "max_ms": round(float(a.max()), 2) if len(a) else None}
        return out


def _scrape(port: int | None) -> dict:
    if not port:
        return {}
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("parity_admission_total{", "parity_requests_total{", "parity_grpc_calls_total{")) and not line.endswith(" 0.0"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def _offer(target: str, user_ids: list[str], qps: float, seconds: float, timeout_s: float, window_s: float | None = None) -> dict:
    from bench.latency import run_latency

    t = time.perf_counter()
    rep = run_latency(target, qps, seconds, user_ids=user_ids, timeout_s=timeout_s, window_s=window_s, concurrency_cap=5000)
    out = rep.summary()
    out["offered_achieved"] = round(rep.sent / max(time.perf_counter() - t, 1e-9), 1)  # what the generator managed to send
    if window_s:
        out["windows"] = list(rep.windows)
    return out


@contextlib.contextmanager
def _pinned(cpu: int | None) -> Iterator[None]:
    """Run this process (the load generator) on one CPU for the duration."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _store(store: str, work: Path):
    from bench.serving import _store as serving_store

    return serving_store(store, work)


def run(out: Path, cfg: ReliabilityConfig, work: Path | None = None) -> dict:
    from bench.latency import UserMix

    tmp = tempfile.TemporaryDirectory(prefix="parity-reliability-") if work is None else None
    work = Path(tmp.name) if tmp else Path(work)
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    pin = cfg.pin and ncpu >= 2 and shutil.which("taskset") is not None
    try:
        _say(f"simulating {cfg.capacity.sim} and training a {cfg.capacity.profile} release in {work}")
        data, release, setup = _prepare(work, cfg.capacity)
        user_ids = UserMix.from_data_dir(data).sample(200_000, seed=0)
        result: dict = {"config": asdict(cfg), "setup": setup, "machine": machine(), "pinned": pin,
                        "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "stores": []}
        for store in cfg.stores:
            with _store(store, work) as url:
                ops, metrics_port = _free_port(), _free_port()
                argv = [sys.executable, "-m", "parity", "serve", "--release", str(release), "--events", str(data), "--store", url,
                        "--namespace", "reliability", "--ops-port", str(ops), *cfg.server_args]
                if pin:
                    argv = ["taskset", "-c", "0", *argv]
                srv = ServerProcess(argv, work / f"server-{store}.log")
                srv.argv += ["--metrics-port", str(metrics_port)]  # after ServerProcess's own "--metrics-port 0": the last one counts
                with srv, _pinned(1 if pin else None):
                    rec: dict = {"store": store, "startup_s": round(srv.started_s, 1)}
                    _say(f"{store}: warm-up, then the capacity search")
                    _offer(srv.target, user_ids, cfg.capacity.fixed_qps / 2, cfg.capacity.warmup_seconds, cfg.timeout_s)

                    def measure(q: float) -> dict:
                        time.sleep(cfg.capacity.cooldown_s)
                        s = _offer(srv.target, user_ids, q, cfg.capacity.step_seconds, cfg.timeout_s)
                        _say(f"  {q:7.1f}/s: p99 {s['p99_ms']} ms, errors {s['errors']}, ok/s {s['qps_achieved']:.1f}")
                        return s

                    capacity, steps = capacity_search(measure, cfg.capacity)
                    rec["capacity_qps"] = capacity
                    rec["capacity_steps"] = [asdict(s) for s in steps]
                    rec["multiples"] = []
                    for m in cfg.multiples:
                        q = round(capacity * m, 1)
                        time.sleep(cfg.capacity.cooldown_s)
                        targets = {"main": srv.target, "ops": f"127.0.0.1:{ops}"}
                        cpu0 = _thread_cpu(srv.proc.pid)
                        with HealthProbe(targets) as probe:
                            s = _offer(srv.target, user_ids, q, cfg.seconds, cfg.timeout_s)
                        s.update(multiple=m, qps=q, goodput_ratio=round(s["qps_achieved"] / capacity, 3) if capacity else None,
                                 health=probe.summary(), server_cpu_s=_cpu_delta(cpu0, _thread_cpu(srv.proc.pid)))
                        _say(f"{store} {m:g}x ({q}/s): goodput {s['qps_achieved']:.1f}/s ({s['goodput_ratio']}x capacity), "
                             f"OK p99 {s['p99_ms']} ms, errors {s['errors_by_code']}, generator sent {s['offered_achieved']}/s")
                        rec["multiples"].append(s)
                        if m == max(cfg.multiples):
                            t_end = time.perf_counter()
                            rec_run = _offer(srv.target, user_ids, round(capacity * cfg.recovery_fraction, 1), cfg.recovery_seconds, cfg.timeout_s,
                                             window_s=cfg.recovery_window_s)
                            gap = time.perf_counter() - t_end - cfg.recovery_seconds  # ~0: the 1x run starts as the overload's last answers land
                            r = recovery_s(rec_run["windows"], cfg.recovery_window_s)
                            rec["recovery"] = {"after_multiple": m, "at_fraction": cfg.recovery_fraction, "recovery_s": r, "gap_s": round(max(gap, 0.0), 3),
                                               "windows": rec_run["windows"], "errors_by_code": rec_run["errors_by_code"],
                                               "p99_ms": rec_run["p99_ms"]}
                            _say(f"{store}: back to p99 <= 50 ms with no errors {r} s after the {m:g}x overload")
                    rec["server_metrics"] = _scrape(metrics_port)
                result["stores"].append(rec)
                write_json(out, result)
        result["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_json(out, result)
        return result
    finally:
        if tmp:
            tmp.cleanup()


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process (Linux /proc), summed over threads of one name."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return out


def _cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Per thread name: the server's Python threads ('python') and gRPC's C-core threads."""
    return {k: round(b.get(k, 0.0) - a.get(k, 0.0), 2) for k in sorted(b) if b.get(k, 0.0) - a.get(k, 0.0) > 0.005}


def _free_port() -> int:
    from bench.serving import _free_port as fp

    return fp()



def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reliability", description="Goodput and latency at 1x-10x capacity, and recovery.")
    p.add_argument("--out", default="bench/results/reliability.json")
    p.add_argument("--quick", action="store_true", help="a short run of every step (smoke check; not for RESULTS.md)")
    p.add_argument("--stores", default=None, help="comma-separated: memory,redis (default memory)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the server and the generator to separate CPUs")
    p.add_argument("--work", default=None, help="keep data, release and server logs here")
    p.add_argument("--server-args", default="", help="extra `parity serve` options, e.g. '--core-pending 8,12'")
    a = p.parse_args(argv)
    cfg = ReliabilityConfig.quick() if a.quick else ReliabilityConfig()
    if a.stores:
        cfg = replace(cfg, stores=tuple(s.strip() for s in a.stores.split(",") if s.strip()))
    if a.server_args:
        cfg = replace(cfg, server_args=tuple(a.server_args.split()))
    if a.no_pin:
        cfg = replace(cfg, pin=False)
    run(Path(a.out), cfg, Path(a.work) if a.work else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
