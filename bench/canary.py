"""Closed-loop canary study: bad canaries rolled back through a real server, a good one left alone.

For each seed a real server (server.app.BackgroundServer, real gRPC on 127.0.0.1) serves the
primary release from a releases root that also holds four canaries derived from it
(bench/canary_releases.py: good, slow, broken_features, worse). For each canary in turn:

1. Admin SetRollout (gRPC): the canary at `percent` %, an explicit salt, and the guard
   thresholds `THRESHOLDS`, chosen once for every scenario (not per scenario).
2. Requests for simulator users (drawn uniformly from the users of the data's event log,
   seeded) through ParityClient.recommend; each served list is answered by the closed-loop
   feedback model (features.closed_loop.FeedbackModel: impressions, plays with watch
   seconds, likes, timed on the server clock) and the events are sent back with IngestEvents
   carrying the request id, in batches of `ingest_every` requests.
3. Every `check_every` requests the guard decides (`service.rollouts.check()` on the
   server's loop; the server's own timer is set far out so decisions happen at known
   request counts). The first rollback ends the scenario: requests and seconds since
   SetRollout, the reason, and the numbers the guard recorded (read back with GetRollout).
   No rollback within `cap_requests` is "not rolled back" (what the good canary must get).
4. Then a request for a canary user must be answered by the primary (the rollback took
   effect on the request path), and the rollout is aborted if still running.

Per-user contribution caps at the ingest edge are off in this harness
(ingest_max_per_item / ingest_max_per_user = 0): the loop compresses hours of a user's
activity into a minute of event time and would otherwise be refused as abuse. Nothing
else in the server is changed.

`python -m bench.canary [--seeds 0 1 2 3 4] [--out bench/results/canary.json]`; the report
(bench/canary_report.py) renders the JSON as a section of bench/RESULTS.md. A smaller version
runs in tests/server/test_canary_closed_loop.py.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

__all__ = ["THRESHOLDS", "LoopConfig", "Scenario", "Study", "main", "run_scenario", "run_study", "summarise"]

# The canary guard's thresholds for every scenario (overrides of server.canary_guard.GuardThresholds
# defaults; p99_ratio 1.5, p99_floor_ms 25, error_margin 0.01, missing_margin 0.05, psi_margin 0.2,
# alpha 0.05 and msprt_tau 0.1 stay at their defaults).
THRESHOLDS: dict[str, float] = {"window_s": 30.0, "bucket_s": 2.0, "min_requests": 100, "min_feedback": 100}
ADMIN_TOKEN = "canary-study-token"


@dataclass(frozen=True)
class LoopConfig:
    percent: float = 30.0
    cap_requests: int = 4000
    check_every: int = 50
    ingest_every: int = 25
    k: int = 10
    thresholds: dict = field(default_factory=lambda: dict(THRESHOLDS))
    timeout_s: float = 5.0


@dataclass(frozen=True)
class Scenario:
    kind: str
    canary: str  # the canary's release id (a folder under the releases root)
    salt: str
    seed: int


def _say(msg: str) -> None:
    print(f"[canary] {msg}", file=sys.stderr, flush=True)


class _Admin:
    """SetRollout / GetRollout through gRPC with the admin token."""

    def __init__(self, target: str, token: str) -> None:
        from parity_api.v1 import recommender_pb2_grpc as pb_grpc

        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.AdminStub(self._channel)
        self._md = [("authorization", f"Bearer {token}")]

    def set(self, canary: str, percent: float, salt: str, thresholds: dict) -> dict:
        from parity.cli_rollout import status_to_dict
        from parity_api.v1 import recommender_pb2 as pb

        spec = pb.RolloutSpec(canary=canary, canary_percent=percent, salt=salt, thresholds={k: float(v) for k, v in thresholds.items()})
        return status_to_dict(self._stub.SetRollout(pb.SetRolloutRequest(spec=spec), timeout=120, metadata=self._md))

    def abort(self) -> dict:
        from parity.cli_rollout import status_to_dict
        from parity_api.v1 import recommender_pb2 as pb

        return status_to_dict(self._stub.SetRollout(pb.SetRolloutRequest(abort=True), timeout=30, metadata=self._md))

    def get(self) -> dict:
        from parity.cli_rollout import status_to_dict
        from parity_api.v1 import recommender_pb2 as pb

        return status_to_dict(self._stub.GetRollout(pb.GetRolloutRequest(), timeout=30, metadata=self._md))

    def close(self) -> None:
        self._channel.close()


def _decision_summary(d: dict | None) -> dict:
    """The figures of a guard decision worth keeping (the whole record is large)."""
    if not d:
        return {}
    n = d.get("numbers", {})
    out: dict[str, Any] = {"reason": d.get("reason"), "all_reasons": n.get("all_reasons", []), "since_start_s": n.get("since_start_s")}
    for arm in ("primary", "canary"):
        a = n.get(arm) or {}
        out[arm] = {k: a.get(k) for k in ("release_id", "requests", "errors", "p99_ms", "missing_rate", "prediction_psi", "ctr",
                                          "watch_s_per_request", "impressions", "plays", "feedback_requests")}
    for test in ("ctr_test", "watch_test"):
        if test in n:
            out[test] = n[test]
    out["business_level"] = n.get("business_level")
    return out


_TRACE_COLUMNS = ("requests", "p99_primary_ms", "p99_canary_ms", "psi_primary", "psi_canary", "ctr_primary", "ctr_canary",
                  "watch_primary_s", "watch_canary_s", "p_ctr", "p_watch")


def _trace_point(n: int, d) -> list:
    """One guard decision as a row of _TRACE_COLUMNS (how the figures moved until the decision)."""
    num = d.numbers
    p, c = num.get("primary", {}), num.get("canary", {})
    r = lambda v: None if v is None else round(float(v), 4)  # noqa: E731
    return [n, r(p.get("p99_ms")), r(c.get("p99_ms")), r(p.get("prediction_psi")), r(c.get("prediction_psi")), r(p.get("ctr")),
            r(c.get("ctr")), r(p.get("watch_s_per_request")), r(c.get("watch_s_per_request")),
            r(num.get("ctr_test", {}).get("always_valid_p")), r(num.get("watch_test", {}).get("always_valid_p"))]


def _category(reason: str | None) -> str | None:
    if not reason:
        return None
    return reason.split(":", 1)[0].strip()


def run_scenario(srv, client, admin: _Admin, model, users: np.ndarray, sc: Scenario, cfg: LoopConfig) -> dict:
    """One canary through the closed loop (see the module docstring). Returns its record."""
    from server.client import LiveEvent
    from server.rollout import arm_of

    rng = np.random.default_rng([sc.seed, 7919])
    started = admin.set(sc.canary, cfg.percent, sc.salt, cfg.thresholds)
    if started["state"] != "canary" or started["canary_release_id"] != sc.canary:
        raise RuntimeError(f"rollout did not start: {started}")
    version = started["version"]
    t0 = time.monotonic()
    pending: list[LiveEvent] = []
    arms = {"primary": 0, "canary": 0}
    lat = {"primary": [], "canary": []}
    ingest: dict[str, Any] = {"events": 0, "accepted": 0, "duplicates": 0, "late": 0, "invalid": 0, "limited": 0}
    decisions = 0
    trace: list[list] = []
    rollback: dict | None = None
    last = None

    def flush() -> None:
        if not pending:
            return
        s = client.ingest(pending)
        ingest["events"] += len(pending)
        for key in ("accepted", "duplicates", "late", "invalid", "limited"):
            ingest[key] += getattr(s, key)
        for key in ("first_invalid", "first_limited"):
            if getattr(s, key) and key not in ingest:
                ingest[key] = getattr(s, key)
        pending.clear()

    n = 0
    for n in range(1, cfg.cap_requests + 1):
        user = int(users[rng.integers(len(users))])
        rid = f"{sc.kind}-{sc.salt}-{n}"
        t = time.perf_counter()
        rec = client.recommend(user, cfg.k, request_id=rid)
        lat[rec.arm].append((time.perf_counter() - t) * 1000)
        arms[rec.arm] += 1
        now_ms = srv.service.clock.now_ms()
        for e in model.respond(user, [int(i) for i in rec.item_ids], now_ms, rec.request_id):
            pending.append(LiveEvent(e.event_id, e.ts_ms, e.user_id, e.item_id, e.type, e.value, e.request_id))
        if n % cfg.ingest_every == 0:
            flush()
        if n % cfg.check_every == 0:
            flush()
            d = srv.run(srv.service.rollouts.check())
            decisions += 1
            last = d
            if d is not None:
                trace.append(_trace_point(n, d))
            if d is not None and d.action == "rollback":
                rollback = {"requests": n, "canary_requests": arms["canary"], "seconds": round(time.monotonic() - t0, 3),
                            "decisions": decisions}
                break
    flush()
    status = admin.get()
    out: dict[str, Any] = {"kind": sc.kind, "seed": sc.seed, "salt": sc.salt, "canary_release_id": sc.canary, "rollout_version": version,
                           "percent": cfg.percent, "requests_sent": n, "arm_requests": arms, "decisions": decisions,
                           "seconds_run": round(time.monotonic() - t0, 3),
                           "client_latency_ms": {a: {"p50": round(float(np.percentile(v, 50)), 2), "p99": round(float(np.percentile(v, 99)), 2)}
                                                 for a, v in lat.items() if v},
                           "ingest": ingest, "state_after": status["state"], "rolled_back": rollback is not None,
                           "trace_columns": list(_TRACE_COLUMNS), "trace": trace}
    if rollback is not None:
        out.update(rollback)
        rec_d = status["last_decision"] if isinstance(status["last_decision"], dict) else None
        out["decision"] = _decision_summary(rec_d)
        out["category"] = _category(out["decision"].get("reason"))
        # the rollback reaches the request path: a canary user is answered by the primary now
        canary_user = next((int(u) for u in users if arm_of(int(u), sc.salt, cfg.percent) == "canary"), None)
        if canary_user is not None:
            after = client.recommend(canary_user, cfg.k, request_id=f"{sc.kind}-{sc.salt}-after")
            out["after_rollback"] = {"user": canary_user, "arm": after.arm, "release_id": after.release_id}
    else:
        out["final"] = _decision_summary({"reason": last.reason, "numbers": last.numbers} if last is not None else None)
        out["category"] = None
        if status["state"] == "canary":
            admin.abort()
    return out


@dataclass(frozen=True)
class Study:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    kinds: tuple[str, ...] = ("good", "slow", "broken_features", "worse")
    sim: dict = field(default_factory=lambda: {"users": 1000, "items": 300, "days": 7, "seed": 1})
    profile: str = "tiny"
    slow_ms: float = 45.0
    loop: LoopConfig = field(default_factory=LoopConfig)


def server_config(release: Path, data_dir: Path, root: Path, **overrides):
    from server.config import ServerConfig

    base = dict(release=release, data_dir=data_dir, releases_root=root, host="127.0.0.1", port=0, metrics_port=None,
                admin_token=ADMIN_TOKEN, cpu_threads=2, io_threads=4, drain_grace_s=2.0,
                guard_interval_s=3600.0,  # decisions are taken by the harness, at known request counts
                drift_interval_s=0.0, ingest_max_per_item=0, ingest_max_per_user=0)
    base.update(overrides)
    return ServerConfig(**base)


def prepare_root(base_release: Path, root: Path, *, slow_ms: float = 45.0, slow_layers: int | None = None,
                 kinds: tuple[str, ...] = ("good", "slow", "broken_features", "worse")) -> tuple[Path, dict]:
    """A releases root holding a copy of the base release and its canaries; (primary path, canaries)."""
    from bench.canary_releases import calibrate_slow_layers, derive
    from export.release import load_release

    base = load_release(base_release)
    root.mkdir(parents=True, exist_ok=True)
    primary = root / base.release_id
    if not primary.exists():
        shutil.copytree(base.path, primary)
    extra = None
    if slow_layers is None and "slow" in kinds:
        slow_layers, extra = calibrate_slow_layers(base, slow_ms)
    canaries = {k: derive(base, root, k, slow_layers=slow_layers or 1) for k in kinds}
    info = {k: {"release_id": c.release_id, **c.note} for k, c in canaries.items()}
    if extra is not None:
        info["slow"]["extra_ms_per_ranker_call_calibrated"] = round(extra, 1)
    return primary, info


def run_seed(primary: Path, data_dir: Path, root: Path, canaries: dict, seed: int, loop: LoopConfig, kinds: tuple[str, ...]) -> list[dict]:
    from features.closed_loop import FeedbackModel
    from server.app import BackgroundServer
    from server.client import ParityClient

    model = FeedbackModel.from_data_dir(data_dir, seed=seed)
    users = model.user_ids
    out = []
    for kind in kinds:  # a fresh server per scenario: each starts from the data's state, not the last one's feedback
        with BackgroundServer(server_config(primary, data_dir, root)) as srv:
            target = f"127.0.0.1:{srv.port}"
            admin = _Admin(target, ADMIN_TOKEN)
            try:
                with ParityClient(target, timeout_s=loop.timeout_s, admin_token=ADMIN_TOKEN) as client:
                    sc = Scenario(kind, canaries[kind]["release_id"], f"salt-{seed}", seed)  # one salt per seed: every canary gets the same users
                    r = run_scenario(srv, client, admin, model, users, sc, loop)
            finally:
                admin.close()
        _say(f"seed {seed} {kind:16s}: " + (f"rolled back after {r['requests']} requests ({r['canary_requests']} canary), "
                                            f"{r['seconds']:.1f} s: {r['decision']['reason']}" if r["rolled_back"]
                                            else f"not rolled back in {r['requests_sent']} requests ({r['seconds_run']:.1f} s)"))
        out.append(r)
    return out


def summarise(runs: list[dict], cap: int) -> dict:
    """Per kind: how many rolled back, the spread of requests and seconds until then, the reasons."""
    out = {}
    for kind in sorted({r["kind"] for r in runs}, key=lambda k: ("good", "slow", "broken_features", "worse").index(k)
                       if k in ("good", "slow", "broken_features", "worse") else 9):
        rs = [r for r in runs if r["kind"] == kind]
        rb = [r for r in rs if r["rolled_back"]]
        req = [r["requests"] for r in rb]
        can = [r["canary_requests"] for r in rb]
        sec = [r["seconds"] for r in rb]
        stat = lambda v: ({"min": min(v), "median": float(np.median(v)), "max": max(v)} if v else None)  # noqa: E731
        cats: dict[str, int] = {}
        fired: dict[str, int] = {}  # every check that fired at the rollback, not only the first (the reason)
        for r in rb:
            cats[r["category"]] = cats.get(r["category"], 0) + 1
            for c in {_category(x) for x in r["decision"].get("all_reasons", [])}:
                fired[c] = fired.get(c, 0) + 1
        out[kind] = {"runs": len(rs), "rolled_back": len(rb), "cap_requests": cap, "requests": stat(req), "canary_requests": stat(can),
                     "seconds": stat(sec), "reasons": cats, "checks_fired": fired,
                     "rollback_took_effect": all(r.get("after_rollback", {}).get("arm") == "primary" for r in rb)}
    return out


def run_study(out: Path, study: Study, work: Path | None = None) -> dict:
    from features.simulator import simulate
    from pipeline.train import train_release

    tmp = tempfile.TemporaryDirectory(prefix="parity-canary-") if work is None else None
    work = Path(tmp.name) if tmp else Path(work)
    try:
        data = work / "data"
        t0 = time.perf_counter()
        _say(f"simulating {study.sim} and training a {study.profile} release in {work}")
        simulate(data, **study.sim)
        base = train_release(data, work / "trained", profile=study.profile, seed=0)
        setup_s = time.perf_counter() - t0
        primary, canaries = prepare_root(base.path, work / "releases", slow_ms=study.slow_ms, kinds=study.kinds)
        _say(f"canaries: {json.dumps(canaries)}")
        runs = []
        for seed in study.seeds:
            runs += run_seed(primary, data, work / "releases", canaries, seed, study.loop, study.kinds)
        res = {"config": {**asdict(study), "loop": asdict(study.loop)}, "thresholds": study.loop.thresholds,
               "setup": {"primary_release_id": base.release_id, "setup_s": round(setup_s, 1), "canaries": canaries},
               "machine": {"python": platform.python_version(), "cpus": _cpus(), "platform": platform.platform()},
               "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "summary": summarise(runs, study.loop.cap_requests), "runs": runs}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1, sort_keys=True, default=float) + "\n")
        return res
    finally:
        if tmp is not None:
            tmp.cleanup()


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="closed-loop canary rollback study")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--kinds", nargs="+", default=["good", "slow", "broken_features", "worse"])
    ap.add_argument("--cap", type=int, default=4000, help="requests per scenario before 'not rolled back'")
    ap.add_argument("--percent", type=float, default=30.0)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--slow-ms", type=float, default=45.0)
    ap.add_argument("--work", type=Path, default=None, help="keep the data, releases and canaries here")
    ap.add_argument("--out", type=Path, default=Path("bench/results/canary.json"))
    args = ap.parse_args(argv)
    study = Study(seeds=tuple(args.seeds), kinds=tuple(args.kinds), sim={**Study().sim, "users": args.users, "items": args.items},
                  slow_ms=args.slow_ms, loop=replace(LoopConfig(), cap_requests=args.cap, percent=args.percent))
    res = run_study(args.out, study, args.work)
    print(json.dumps(res["summary"], sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
