"""Two facts about grpc.aio that the admission design rests on, measured on bare servers.

    python -m bench.grpc_probe [--seconds 6] [--out bench/results/grpc_probe.json]

1. `accept`: a server whose handler blocks the event loop for 3 ms (as inline request work
   does). Offered 3x what it can serve, how many calls does Python pick up from the C core?
   If "accepted" is about "served", the excess waits in the C core, unseen by Python, and
   shedding must happen there (server/admission.py).
2. `reject`: a server that refuses every call in Python (context.abort RESOURCE_EXHAUSTED), and
   the same refusals by gRPC's C core (pending-queue limit): event-loop CPU per refused call.

Each server runs in a child process pinned to CPU 0 (the generator to CPU 1, when there are two);
CPU time per thread is read from /proc.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]

_SERVER = r"""
import asyncio, sys, time, grpc
from parity_api.v1 import recommender_pb2 as pb, recommender_pb2_grpc as pbg
mode, port = sys.argv[1], int(sys.argv[2])
entered = done = 0
class S(pbg.RecommenderServicer):
    async def Recommend(self, req, ctx):
        global entered, done
        entered += 1
        if mode == "abort":
            await ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused")
        t = time.perf_counter()
        while time.perf_counter() - t < 0.003:
            pass
        done += 1
        return pb.RecommendResponse(release_id="x")
async def report():
    while True:
        await asyncio.sleep(0.2)
        print(entered, done, flush=True)
async def main():
    opts = [("grpc.so_reuseport", 0)]
    if mode == "core":
        opts += [("grpc.server.max_pending_requests", 0), ("grpc.server.max_pending_requests_hard_limit", 1)]
    s = grpc.aio.server(options=opts)
    pbg.add_RecommenderServicer_to_server(S(), s)
    s.add_insecure_port(f"127.0.0.1:{port}")
    await s.start()
    asyncio.ensure_future(report())
    await s.wait_for_termination()
asyncio.run(main())
"""


def _cpu_s(pid: int) -> tuple[float, float]:
    """(CPU seconds of the main event-loop thread, of all other threads: gRPC's C core)."""
    loop = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        f = (task / "stat").read_text().rsplit(")", 1)[1].split()
        t = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        if task.name == str(pid):
            loop += t
        else:
            other += t
    return loop, other


def _probe(mode: str, qps: float, seconds: float) -> dict:
    from bench.latency import run_latency
    from bench.serving import _free_port

    port = _free_port()
    pin = ["taskset", "-c", "0"] if len(os.sched_getaffinity(0)) >= 2 else []
    proc = subprocess.Popen([*pin, sys.executable, "-c", _SERVER, mode, str(port)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        proc.stdout.readline()  # the server is up and reporting
        loop0, other0 = _cpu_s(proc.pid)
        if pin:
            os.sched_setaffinity(0, {1})
        rep = run_latency(f"127.0.0.1:{port}", qps, seconds, warmup=0, concurrency_cap=5000)
        loop1, other1 = _cpu_s(proc.pid)
        time.sleep(0.5)
    finally:
        proc.kill()
        out = proc.stdout.read()
        proc.wait()
    entered, done = (int(x) for x in out.strip().splitlines()[-1].split())
    refused = rep.n_errors
    loop, other = loop1 - loop0, other1 - other0
    row = {"mode": mode, "offered_qps": qps, "seconds": seconds, "sent": rep.sent, "ok": rep.ok, "errors_by_code": rep.errors,
           "python_accepted": entered, "python_served": done, "event_loop_cpu_s": round(loop, 3), "other_threads_cpu_s": round(other, 3)}
    if mode == "abort" and refused:
        row["loop_us_per_refused_call"] = round(loop / refused * 1e6, 1)
    if mode == "core" and refused:
        row["core_threads_us_per_call"] = round(other / rep.sent * 1e6, 1)  # all calls' HTTP/2 work, dropped ones included
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpc_probe", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--out", default="bench/results/grpc_probe.json")
    a = p.parse_args(argv)
    rows = [_probe("accept", 1000.0, a.seconds), _probe("abort", 1000.0, a.seconds), _probe("core", 1000.0, a.seconds)]
    for r in rows:
        print(json.dumps(r))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
