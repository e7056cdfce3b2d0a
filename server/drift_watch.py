"""Drift of what is served, watched live: Prometheus gauges over a sliding window and an
alert event when a feature or the predictions cross a threshold.

Per request the listener only appends the sampled candidate rows (server/observe.py) to a
bounded buffer (full: dropped and counted); a background task folds the buffer into one
`monitor.drift.SlidingDrift` per arm's release every `interval_s` and computes the figures,
so the statistics (scipy) never run on a request. Time is the requests' as-of time, so a
replayed log (the data clock) drifts exactly as it did.

Alerts: a feature that newly drifts writes one JSON line to `<served_log>/alerts/drift.jsonl`
(when a served log is configured) and a warning to the log, and counts in
parity_drift_alerts_total; one that clears is written too, so the file reads as a timeline.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from export.reference import release_reference
from monitor.drift import PREDICTION, DriftPoll, DriftThresholds, SlidingDrift
from monitor.rolling import RollingRows, rolling_report
from server.background import spawn, stop
from server.metrics import Metrics
from server.observe import Observation
from server.state import ServingState

__all__ = ["DriftWatch", "DriftSettings", "Pacer"]


class Pacer:
    """Keeps a background thread to `share` of the interpreter: called between pieces of work,
    it sleeps (releasing the GIL) in proportion to the work done since the last call. Measured:
    the drift fold and tests are ~200 ms of interpreter time per interval; taken in one go next
    to a saturated event loop they cost the answer path errors (420 req/s, 40 s: 70-102 errors
    with the watch, 0-27 without); paced, the loop keeps the interpreter (bench/RESULTS.md)."""

    def __init__(self, share: float = 0.2) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.share = share
        self._t = time.perf_counter()

    def reset(self) -> None:
        self._t = time.perf_counter()

    def __call__(self) -> None:
        worked = time.perf_counter() - self._t
        if self.share < 1 and worked > 0:
            time.sleep(worked * (1.0 / self.share - 1.0))
        self._t = time.perf_counter()


def _import_stats() -> None:
    import scipy.stats  # noqa: F401 - imported once, off the event loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftSettings:
    window_ms: int = 6 * 3_600_000  # calibrated on simulator validation seeds (bench/drift_calibrate.py)
    buckets: int = 12
    interval_s: float = 60.0
    max_pending: int = 20_000  # observations buffered between folds
    max_requests_per_s: float = 50.0  # requests taken into the window per second: a 6 h window still holds ~8.6M rows,
    # and the fold's CPU stays bounded at any traffic (it shares the interpreter with the requests)
    thresholds: DriftThresholds = DriftThresholds()
    reference: str = "rolling"  # rolling: the served rows of the `reference_ms` before the window (the release's until there are enough)
    reference_ms: int = 48 * 3_600_000
    cpu_share: float = 0.2  # the fold and the tests pace themselves to this share of the interpreter


class DriftWatch:
    def __init__(self, metrics: Metrics, state: ServingState, now_ms: Callable[[], int], *, settings: DriftSettings = DriftSettings(),
                 alerts_dir: Path | None = None) -> None:
        self.metrics = metrics
        self.state = state
        self.now_ms = now_ms
        self.settings = settings
        self.alerts_path = (Path(alerts_dir) / "drift.jsonl") if alerts_dir is not None else None
        self._pending: deque[Observation] = deque()
        self._windows: dict[tuple[str, str], SlidingDrift] = {}  # (arm, release id) -> window
        self._rolling: dict[tuple[str, str], RollingRows] = {}
        self._alerting: dict[tuple[str, str], frozenset[str]] = {}
        self._ref_cache: dict[tuple[str, str], dict] = {}
        self.using: dict[str, str] = {}  # arm -> "rolling" | "release": the reference of the latest report
        self._task: asyncio.Task | None = None
        self.dropped = 0
        self._sec, self._taken = 0, 0
        self._pacer = Pacer(settings.cpu_share)
        self.last: dict[str, DriftPoll] = {}  # arm -> the latest poll

    # -- the request side: O(1) --------------------------------------------------------------------
    def listener(self, obs: Observation) -> None:
        if obs.sampled_inputs is None or not len(obs.sampled_inputs) or obs.status.startswith("error"):
            return
        sec = int(time.monotonic())
        if sec != self._sec:
            self._sec, self._taken = sec, 0
        if self._taken >= self.settings.max_requests_per_s:
            return  # past this second's intake: the window is a sample of the traffic anyway
        self._taken += 1
        if len(self._pending) >= self.settings.max_pending:
            self.dropped += 1
            self.metrics.drift_dropped.inc()
            return
        self._pending.append(obs)

    # -- the background side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = spawn(self._run(), "parity-drift-watch")

    async def close(self) -> None:
        await stop(self._task)
        self._task = None

    async def _run(self) -> None:
        # The statistics run in a thread (a KS test per column every interval, and scipy's first
        # import takes ~0.5 s): on the event loop they would stall every request behind them.
        await asyncio.to_thread(_import_stats)
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                await asyncio.to_thread(self.step)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watch must never stop serving
                log.exception("drift watch step failed")

    def _window(self, arm: str, release_id: str, columns: tuple[str, ...]) -> SlidingDrift | None:
        key = (arm, release_id)
        w = self._windows.get(key)
        if w is None:
            snap = self.state.arm(arm)
            if snap is None or snap.release_id != release_id:
                return None  # the arm moved on to another release: its old rows are of no use
            try:
                ref = release_reference(snap.runtime.release)  # histograms + the raw samples KS reads
            except (OSError, ValueError, KeyError) as exc:
                log.warning("drift: the reference of release %s is unreadable (%s); not checked", release_id, exc)
                ref = None
            if not ref:
                return None  # a release without a reference cannot be checked
            s = self.settings
            w = self._windows[key] = SlidingDrift(ref, columns, window_ms=s.window_ms, buckets=s.buckets, thresholds=s.thresholds)
            w.pace = self._pacer
        return w

    def step(self) -> dict[str, DriftPoll]:
        """Fold the buffered rows in, then report every arm being served (in a worker thread;
        tests call it directly). The buffer is a deque: appends on the loop and pops here are
        thread-safe; the windows are only ever touched here."""
        t = time.perf_counter()
        self._pacer.reset()  # the time since the last step was not work
        groups: dict[tuple[str, str], list[Observation]] = {}
        while self._pending:
            o = self._pending.popleft()
            groups.setdefault((o.arm, o.release_id), []).append(o)
        for (arm, rid), obs in groups.items():
            w = self._window(arm, rid, obs[0].columns)
            if w is None:
                continue
            X = np.concatenate([o.sampled_inputs for o in obs])
            p = np.concatenate([o.sampled_scores for o in obs])
            ts = np.concatenate([np.full(len(o.sampled_inputs), o.ts_ms, dtype=np.int64) for o in obs])
            w.add(X, p, ts)
            if self.settings.reference == "rolling":
                r = self._rolling.get((arm, rid))
                if r is None:
                    r = self._rolling[(arm, rid)] = RollingRows(obs[0].columns, keep_ms=self.settings.reference_ms + self.settings.window_ms
                                                                 + 3_600_000)
                r.add(X, p, ts)
        serving = {(a, s.release_id) for a, s in self.state.arms().items()}
        for key in [k for k in self._windows if k not in serving]:
            del self._windows[key]  # a release no longer served
            self._rolling.pop(key, None)
            self._ref_cache.pop(key, None)
            self._alerting.pop(key, None)
        now = self.now_ms()
        out = {}
        for (arm, rid), w in self._windows.items():
            rep, using = None, "release"
            if (arm, rid) in self._rolling:
                got = rolling_report(self._rolling[(arm, rid)], now, window_ms=self.settings.window_ms,
                                     reference_ms=self.settings.reference_ms, thresholds=self.settings.thresholds,
                                     cache=self._ref_cache.setdefault((arm, rid), {}))
                if got is not None:
                    rep, using = got[0], "rolling"
            if rep is None:
                rep = w.report(now)
            was = self._alerting.get((arm, rid), frozenset())
            now_set = frozenset(rep.drifted)
            self._alerting[(arm, rid)] = now_set
            poll = DriftPoll(rep, tuple(n for n in rep.drifted if n not in was), tuple(sorted(was - now_set)))
            out[arm] = poll
            self.using[arm] = using
            self.metrics.drift_rolling.labels(arm).set(1.0 if using == "rolling" else 0.0)
            self._export(arm, rid, poll, now)
        self.last = out
        self.metrics.drift_step_seconds.observe(time.perf_counter() - t)
        return out

    def _export(self, arm: str, release_id: str, poll: DriftPoll, now_ms: int) -> None:
        m = self.metrics
        rep = poll.report
        m.drift_rows.labels(arm).set(rep.rows)
        feats = list(rep.features) + ([rep.prediction] if rep.prediction is not None else [])
        for f in feats:
            for gauge, v in ((m.drift_psi, f.psi), (m.drift_js, f.js), (m.drift_p, f.p_adjusted), (m.drift_missing, f.missing_rate)):
                gauge.labels(arm, f.name).set(float("nan") if v is None else float(v))
            m.drift_drifted.labels(arm, f.name).set(1.0 if f.drifted else 0.0)
        for name in poll.new_alerts:
            m.drift_alerts.labels(arm, name).inc()
            f = rep.feature(name)
            self._alert({"event": "drift", "state": "alerting", "arm": arm, "release_id": release_id, "feature": name, "ts_ms": now_ms,
                         "rows": rep.rows, "reference": self.using.get(arm, "release"), "psi": f.psi, "js": f.js, "p_adjusted": f.p_adjusted, "missing_rate": f.missing_rate,
                         "reasons": list(f.reasons), "prediction": name == PREDICTION})
        for name in poll.cleared:
            self._alert({"event": "drift", "state": "cleared", "arm": arm, "release_id": release_id, "feature": name, "ts_ms": now_ms})

    def _alert(self, event: dict) -> None:
        log.warning("drift %s: %s %s (arm %s, release %s)", event["state"], event["feature"],
                    {k: event.get(k) for k in ("psi", "js", "p_adjusted") if k in event}, event["arm"], event["release_id"])
        if self.alerts_path is None:
            return
        try:
            self.alerts_path.parent.mkdir(parents=True, exist_ok=True)
            with self.alerts_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(event, sort_keys=True) + "\n")
        except OSError as exc:
            log.warning("cannot write the drift alert to %s: %s", self.alerts_path, exc)
