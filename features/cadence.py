"""The scheduler-friendly part of the `materialized` mode: which sets are due, and a loop.

A set materialized every E is written as of the cadence boundaries, the multiples of E since
the epoch (less an optional lag): a run at wall time `now` materialises up to
until = floor((now - lag) / E) * E. Boundaries, not `now`, because then every scheduler,
cron job or retry computes the same `until`, and materialize() run twice for one `until`
writes the same bytes: a duplicate run wastes work but never changes an answer. Served
staleness then stays below E plus the run's own duration. The lag leaves time for the log
to receive events up to a boundary before a run reads it.

A set is due when its stored watermark (features.materialize.stored_watermark) is before its
current boundary. Before running, a scheduler claims each due set with an atomic counter in
the store (`OnlineStore.incr_many`, one round trip, atomic per counter on every backend,
Redis Cluster included) named after the watermark the run starts from:
`cadence:{set}:{version}:from:{watermark}`. The first claimant reads 1 and runs; every
other scheduler reads more and skips. No release is needed: a finished run moves the
watermark, so the next run claims a new name; a crashed run's claim expires after the
lease and the set is claimed again. Two runs of one set overlap only if a run outlives its
lease, so the lease must exceed the longest run.

Time here is wall-clock epoch milliseconds on purpose: cadence boundaries are event times
(ms since the epoch), which a monotonic clock does not give. Both the clock and the sleep
are injected, so the logic runs under a fake clock in tests.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from features.definitions import FeatureSet
from features.events import MS_PER_MINUTE
from features.materialize import is_retired, stored_watermark
from features.modes import ModePlan, ServingMode, load_modes
from features.online.base import OnlineStore

__all__ = [
    "DEFAULT_LEASE_MS",
    "DEFAULT_POLL_MS",
    "CadenceRun",
    "DueRun",
    "claim",
    "claim_key",
    "current_boundary",
    "due",
    "due_runs",
    "next_due_ms",
    "run_every",
    "tick",
    "wall_clock_ms",
]

DEFAULT_LEASE_MS = 15 * MS_PER_MINUTE  # longer than any run of the repo's data sets by far
DEFAULT_POLL_MS = MS_PER_MINUTE  # re-read modes and watermarks at least this often

MaterializeFn = Callable[[Sequence[FeatureSet], int], object]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_ms(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int of milliseconds, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class DueRun:
    """Sets due for one materialisation up to `until_ts`, with the watermarks they start from."""

    until_ts: int
    sets: tuple[FeatureSet, ...]
    watermarks: tuple[int | None, ...]


@dataclass(frozen=True)
class CadenceRun:
    """What one scheduler did for one due run."""

    until_ts: int
    ran: tuple[str, ...]  # sets this scheduler claimed and materialised
    skipped: tuple[str, ...]  # due, but another scheduler holds the claim
    started_ms: int
    finished_ms: int
    result: object = None  # whatever materialize_fn returned (MaterializeReports)


def current_boundary(every_ms: int, now_ms: int, lag_ms: int = 0) -> int:
    """The newest cadence boundary at or before now - lag."""
    return (now_ms - lag_ms) // every_ms * every_ms


def due_runs(plan: ModePlan, store: OnlineStore, sets: Sequence[FeatureSet], now_ms: int, *, lag_ms: int = 0) -> list[DueRun]:
    """Materialized sets whose watermark is before their current boundary, grouped by
    boundary (one materialize call per `until`), earliest first. Retired versions are never due."""
    _check_ms("lag_ms", lag_ms, 0)
    groups: dict[int, list[tuple[FeatureSet, int | None]]] = {}
    for fs in plan.sets_in(ServingMode.MATERIALIZED, sets):
        until = current_boundary(plan.of(fs.name).every_ms, now_ms, lag_ms)
        w = stored_watermark(store, fs)
        if (w is None or w < until) and not is_retired(store, fs):
            groups.setdefault(until, []).append((fs, w))
    return [DueRun(u, tuple(fs for fs, _ in g), tuple(w for _, w in g)) for u, g in sorted(groups.items())]


def due(plan: ModePlan, store: OnlineStore, sets: Sequence[FeatureSet], now_ms: int, *, lag_ms: int = 0) -> list[FeatureSet]:
    """The sets due for a materialisation run at now_ms."""
    return [fs for run in due_runs(plan, store, sets, now_ms, lag_ms=lag_ms) for fs in run.sets]


def next_due_ms(plan: ModePlan, sets: Sequence[FeatureSet], now_ms: int, *, lag_ms: int = 0) -> int | None:
    """The earliest wall time after now_ms at which a materialized set reaches a new
    boundary (None: no set is materialized)."""
    times = [current_boundary(m.every_ms, now_ms, lag_ms) + m.every_ms + lag_ms
             for m in (plan.of(fs.name) for fs in plan.sets_in(ServingMode.MATERIALIZED, sets))]
    return min(times, default=None)


def claim_key(fs: FeatureSet, watermark: int | None) -> str:
    """The counter that decides who runs `fs` from `watermark` (one name per run)."""
    return f"cadence:{fs.name}:{fs.version}:from:{'none' if watermark is None else watermark}"


def claim(store: OnlineStore, run: DueRun, lease_ms: int = DEFAULT_LEASE_MS) -> list[bool]:
    """Claim each set of a due run; True where this caller won. One round trip."""
    _check_ms("lease_ms", lease_ms, 1)
    names = [claim_key(fs, w) for fs, w in zip(run.sets, run.watermarks)]
    return [v == 1 for v in store.incr_many(names, [1] * len(names), lease_ms)]


def tick(
    store: OnlineStore,
    sets: Sequence[FeatureSet],
    materialize_fn: MaterializeFn,
    *,
    plan: ModePlan | None = None,
    now: Callable[[], int] = wall_clock_ms,
    lease_ms: int = DEFAULT_LEASE_MS,
    lag_ms: int = 0,
) -> list[CadenceRun]:
    """One scheduling step: claim what is due and materialise what was won, in order.

    The one-shot a cron job or an orchestrator calls. `plan` defaults to the modes stored
    for these set versions. Errors from materialize_fn propagate; the claim then expires
    after the lease and the set is due again.
    """
    plan = load_modes(store, sets) if plan is None else plan
    out = []
    for run in due_runs(plan, store, sets, now(), lag_ms=lag_ms):
        won = claim(store, run, lease_ms)
        mine = [fs for fs, ok in zip(run.sets, won) if ok]
        started = now()
        result = materialize_fn(mine, run.until_ts) if mine else None
        out.append(CadenceRun(run.until_ts, tuple(fs.name for fs in mine),
                              tuple(fs.name for fs, ok in zip(run.sets, won) if not ok), started, now(), result))
    return out


def run_every(
    store: OnlineStore,
    sets: Sequence[FeatureSet],
    materialize_fn: MaterializeFn,
    *,
    stop: threading.Event,
    plan: ModePlan | None = None,
    now: Callable[[], int] = wall_clock_ms,
    sleep: Callable[[float], object] | None = None,
    lease_ms: int = DEFAULT_LEASE_MS,
    lag_ms: int = 0,
    poll_ms: int = DEFAULT_POLL_MS,
    on_run: Callable[[CadenceRun], None] | None = None,
) -> int:
    """Materialise due sets until `stop` is set; returns how many runs this loop made.

    Runs are sequential here and claimed across schedulers (see the module docstring), so
    no two runs of a set overlap. After a run it looks again at once (the run took time; a
    boundary may have passed meanwhile), else it sleeps until the next boundary, at most
    poll_ms, so a mode changed in the store is seen within poll_ms. `sleep` defaults to
    stop.wait, which a stop cuts short. The plan is re-read from the store every step
    unless one is given.
    """
    _check_ms("lease_ms", lease_ms, 1)
    _check_ms("lag_ms", lag_ms, 0)
    _check_ms("poll_ms", poll_ms, 1)
    wait = stop.wait if sleep is None else sleep
    runs = 0
    while not stop.is_set():
        current = load_modes(store, sets) if plan is None else plan
        done = tick(store, sets, materialize_fn, plan=current, now=now, lease_ms=lease_ms, lag_ms=lag_ms)
        for r in done:
            if on_run is not None:
                on_run(r)
        ran = sum(1 for r in done if r.ran)
        runs += ran
        if ran or stop.is_set():
            continue
        t = now()
        nxt = next_due_ms(current, sets, t, lag_ms=lag_ms)
        wait(min(poll_ms if nxt is None else nxt - t, poll_ms) / 1000.0)
    return runs
