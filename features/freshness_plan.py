"""Choosing how each feature set is kept online, from what each choice was measured to cost
and what staleness was measured to be worth.

Inputs, all measured, none guessed:
  * per set and mode, the cost side (bench/freshness_trade.py writes it): CPU seconds per
    event written (streaming folds an event into a state; on_read appends it), CPU seconds
    per entity materialised, request latency added by reading the set in that mode (p99 ms),
    store bytes per entity;
  * per set, the worth side (`parity backtest` writes it): the largest staleness and missing
    rate whose NDCG@10 stays within 1 % of fresh, complete features;
  * per set, the load: events per second that feed it and the distinct entities the events
    of one cadence window touch (both from the event log), and requests per second (the
    operator's figure).

A mode is allowed when it keeps quality (a materialisation cadence no longer than the set's
staleness tolerance; streaming and on_read serve fresh values) and latency (the read it adds
fits the budget). Among allowed modes the cheapest in CPU seconds per second wins; ties go
to streaming, the mode with no cadence to tune. The reasons are kept for the table.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

__all__ = ["ModeCost", "SetLoad", "SetChoice", "plan_modes", "CADENCES_MS", "load_trade", "load_tolerance"]

MINUTE_MS = 60_000
CADENCES_MS = (5 * MINUTE_MS, 15 * MINUTE_MS, 60 * MINUTE_MS, 6 * 60 * MINUTE_MS, 24 * 60 * MINUTE_MS)


@dataclass(frozen=True)
class ModeCost:
    """One set in one mode, as measured."""

    write_s_per_event: float  # CPU seconds to apply one event (streaming / on_read); 0 for materialized
    materialize_s_per_entity: float  # CPU seconds per entity a materialisation run writes; 0 otherwise
    read_p99_added_ms: float  # request p99 added by reading this set this way (the latency check)
    bytes_per_entity: float  # online store bytes per entity
    read_ms_per_request: float = 0.0  # mean CPU ms a request spends reading this set this way (the cost)


@dataclass(frozen=True)
class SetLoad:
    events_per_s: float  # events this set consumes
    entities_per_window: Mapping[int, float]  # cadence ms -> distinct entities the events of one such window touch
    staleness_tolerance_ms: float  # from the backtest: NDCG@10 within 1 % up to this staleness
    missing_tolerance: float = 0.0


@dataclass(frozen=True)
class SetChoice:
    feature_set: str
    mode: str
    every_ms: int | None
    cpu_s_per_s: float
    read_p99_added_ms: float
    bytes_per_entity: float
    why: str
    rejected: Mapping[str, str] = field(default_factory=dict)


def _cost(mode: str, c: ModeCost, load: SetLoad, qps: float, every_ms: int | None) -> float:
    if mode == "materialized":
        assert every_ms is not None
        # a run rewrites the entities touched since the last one (an incremental materialisation)
        return 1000.0 / every_ms * load.entities_per_window[every_ms] * c.materialize_s_per_entity + qps * c.read_ms_per_request / 1000.0
    return load.events_per_s * c.write_s_per_event + qps * c.read_ms_per_request / 1000.0


def plan_modes(costs: Mapping[str, Mapping[str, ModeCost]], loads: Mapping[str, SetLoad], *, qps: float,
               latency_budget_ms: float, cadences_ms: Sequence[int] = CADENCES_MS) -> list[SetChoice]:
    """One choice per set in `loads` (a set with no measured costs keeps streaming, said so)."""
    out = []
    for name in sorted(loads):
        load = loads[name]
        by_mode = costs.get(name, {})
        if "streaming" not in by_mode:
            out.append(SetChoice(name, "streaming", None, float("nan"), float("nan"), float("nan"), "no measured costs for this set: today's mode kept"))
            continue
        options: list[tuple[float, int, str, int | None, ModeCost]] = []
        rejected: dict[str, str] = {}
        for order, mode in enumerate(("streaming", "on_read", "materialized")):
            c = by_mode.get(mode)
            if c is None:
                rejected[mode] = "not measured"
                continue
            if c.read_p99_added_ms > latency_budget_ms:
                rejected[mode] = f"adds {c.read_p99_added_ms:.2f} ms to the request p99 (budget {latency_budget_ms:g} ms)"
                continue
            if mode == "materialized":
                fits = [e for e in cadences_ms if e <= load.staleness_tolerance_ms]
                if not fits:
                    rejected[mode] = ("no staleness tolerated (no backtest given, or NDCG@10 fell by more than 1 % at its smallest staleness)"
                                      if load.staleness_tolerance_ms <= 0 else
                                      f"quality drops by more than 1 % past {load.staleness_tolerance_ms / MINUTE_MS:g} min of staleness, "
                                      f"shorter than the shortest cadence ({min(cadences_ms) / MINUTE_MS:g} min)")
                    continue
                every = max(fits)
                options.append((_cost(mode, c, load, qps, every), order, mode, every, c))
            else:
                options.append((_cost(mode, c, load, qps, None), order, mode, None, c))
        if not options:
            out.append(SetChoice(name, "streaming", None, float("nan"), float("nan"), float("nan"),
                                 "no mode fits both the latency budget and the staleness tolerance: streaming kept", rejected))
            continue
        options.sort(key=lambda o: (round(o[0], 9), o[1]))
        cost, _, mode, every, c = options[0]
        for other_cost, _, other, _, _ in options[1:]:
            rejected[other] = f"costs {other_cost:.4g} CPU-s/s vs {cost:.4g}"
        if mode == "materialized":
            why = (f"quality holds up to {load.staleness_tolerance_ms / MINUTE_MS:g} min of staleness, so a run every "
                   f"{every / MINUTE_MS:g} min serves it for {cost:.4g} CPU-s/s")
        elif mode == "on_read":
            why = f"cheapest ({cost:.4g} CPU-s/s) and its read adds {c.read_p99_added_ms:.2f} ms p99, inside the budget"
        else:
            why = f"cheapest allowed ({cost:.4g} CPU-s/s) and always fresh"
        out.append(SetChoice(name, mode, every, cost, c.read_p99_added_ms, c.bytes_per_entity, why, rejected))
    return out


def load_trade(doc: Mapping) -> dict[str, dict[str, ModeCost]]:
    """The `sets` part of bench/freshness_trade.py's JSON: {set: {mode: {ModeCost fields}}}."""
    out: dict[str, dict[str, ModeCost]] = {}
    for name, modes in doc["sets"].items():
        out[name] = {m: ModeCost(**{k: float(v[k]) for k in ModeCost.__dataclass_fields__ if k in v}) for m, v in modes.items()}
    return out


def load_tolerance(doc: Mapping) -> dict[str, tuple[float, float]]:
    """The `tolerance` part of `parity backtest`'s JSON: {set: (max_staleness_ms, max_missing)}."""
    return {name: (float(t["max_staleness_ms"]), float(t.get("max_missing", 0.0))) for name, t in doc["tolerance"].items()}


def _finite(v: object) -> object:
    return None if isinstance(v, float) and v != v else v  # JSON has no NaN: an unmeasured figure is null


def as_json(choices: Sequence[SetChoice]) -> str:
    rows = [{k: _finite(v) for k, v in (asdict(c) | {"rejected": dict(c.rejected)}).items()} for c in choices]
    return json.dumps({"plan": rows}, sort_keys=True, default=str, allow_nan=False)
