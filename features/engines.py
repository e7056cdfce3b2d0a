"""Where the batch path runs: in this process (the default) or on a Ray cluster.

An engine makes the batch engine of one feature set over one event log: `batch_engine(layout,
events)` returns an object with the `BatchEngine` calls the batch path makes (`states_asof`,
`features_asof`, `map_chunks`, `entities`). The local engine returns `BatchEngine` itself;
the Ray engine (features.engine_ray, imported only when asked for) returns one whose events
are split by entity hash (features.partition) over workers and whose answers are the same
bytes in the same order. Ray is an optional extra: nothing else imports it, the server never.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from features.batch import BatchEngine
from features.events import EventBatch
from features.partition import split_by_partition
from features.state import FeatureFrame, StateLayout

__all__ = ["ENGINES", "Engine", "SetEngine", "EngineUnavailable", "LocalEngine", "LOCAL", "PARTITION_EVENTS", "PartitionedBatchEngine", "gather_frame", "gather_states", "open_engine"]

ENGINES = ("local", "ray")


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot run here (its optional dependency is not installed)."""


class SetEngine(Protocol):
    entities: np.ndarray

    def states_asof(self, codes: np.ndarray, t: np.ndarray) -> np.ndarray: ...
    def features_asof(self, codes: np.ndarray, t: np.ndarray) -> FeatureFrame: ...
    def map_chunks(self, fn, codes: np.ndarray, chunk: int): ...


class Engine(Protocol):
    name: str

    def batch_engine(self, layout: StateLayout, events: EventBatch) -> SetEngine: ...
    def close(self) -> None: ...


PARTITION_EVENTS = 250_000  # a set's events per in-process partition (below: one BatchEngine, as always)


class LocalEngine:
    """The single process. Up to `PARTITION_EVENTS` of a set's events, `BatchEngine` as it
    always was; past that, `PartitionedBatchEngine` over ceil(events / PARTITION_EVENTS)
    entity-hash partitions (features.partition, the Ray engine's rule), which answers the same
    bytes: the build's sorts and scans grow faster than the log (they make one pass per doubling
    of the longest entity history, and leave the CPU caches), so smaller partitions keep it
    linear. Measured (states of every entity of the four simulated sets as of the log's end, CPU
    s, one thread, two runs each, /tmp/prof/part.py): 0.95M events 3.0/3.2 whole, 2.7/2.7 in 4
    partitions; 3.9M events 16.7/18.2 whole, 11.8/12.7 in 16 (4 partitions of 1M: 15.3/13.7);
    growth exponent 1.22 whole, 1.07 partitioned."""

    name = "local"

    def __init__(self, partition_events: int = PARTITION_EVENTS) -> None:
        if partition_events < 1:
            raise ValueError(f"partition_events must be >= 1, got {partition_events}")
        self.partition_events = int(partition_events)

    def batch_engine(self, layout: StateLayout, events: EventBatch) -> "BatchEngine | PartitionedBatchEngine":
        n = -(-len(events) // self.partition_events)
        return BatchEngine(layout, events) if n <= 1 else PartitionedBatchEngine(layout, events, n)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


LOCAL = LocalEngine()


def open_engine(name: str = "local", address: str | None = None, **options) -> Engine:
    """The engine named `name` ("local" or "ray"). For "ray", `address` joins a running cluster
    (None: start a local one); `options` go to `RayEngine` (workers, partitions_per_worker, ...).
    Raises EngineUnavailable when ray is not installed. Close it (or use it as a context)."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")
    if name == "local":
        if address is not None or options:
            raise ValueError("the local engine takes no address or options (they are for the ray engine)")
        return LocalEngine()
    try:
        import ray  # noqa: F401
    except ImportError:
        raise EngineUnavailable("the ray engine needs Ray: pip install 'parity[ray]' (ray==2.52.0)") from None
    from features.engine_ray import RayEngine

    return RayEngine(address=address, **options)


class PartitionedBatchEngine:
    """`BatchEngine`'s calls for one feature set, answered by one BatchEngine per entity-hash
    partition in this process: the same split, routing and answer order as the Ray engine's
    (features.engine_ray.RayBatchEngine), so the same bytes as one BatchEngine over the log."""

    def __init__(self, layout: StateLayout, events: EventBatch, n_partitions: int) -> None:
        self.layout = layout
        fs = layout.feature_set
        events = events.deduplicated()  # on the whole log: a duplicate id's first occurrence may be another entity's
        ev = events.take(np.flatnonzero(fs.event_mask(events)))
        self.n_partitions = int(n_partitions)
        self._parts = [BatchEngine(layout, ev.take(idx)) for idx in split_by_partition(fs.entity.codes(ev)[0], self.n_partitions)]
        self.entities = np.sort(np.concatenate([p.entities for p in self._parts]))

    def _routed(self, codes: np.ndarray, t: np.ndarray):
        codes = np.asarray(codes, dtype=np.int64)
        t = np.broadcast_to(np.asarray(t, dtype=np.int64), codes.shape)
        for p, idx in enumerate(split_by_partition(codes, self.n_partitions)):
            if len(idx):
                yield self._parts[p], idx, codes[idx], np.ascontiguousarray(t[idx])

    def states_asof(self, codes: np.ndarray, t: np.ndarray) -> np.ndarray:
        return gather_states(self.layout, len(codes), ((idx, eng.states_asof(c, tt)) for eng, idx, c, tt in self._routed(codes, t)))

    def features_asof(self, codes: np.ndarray, t: np.ndarray, chunk: int = 32_768) -> FeatureFrame:
        def parts():
            for eng, idx, c, tt in self._routed(codes, t):
                fr = eng.features_asof(c, tt, chunk)
                yield idx, (fr.values, fr.missing, fr.feature_ts)
        return gather_frame(self.layout, len(codes), parts())

    def map_chunks(self, fn, codes: np.ndarray, chunk: int):
        """fn(partition engine, chunk of its codes), partition by partition (the Ray engine's
        order); at least one call."""
        codes = np.asarray(codes, dtype=np.int64)
        rows = split_by_partition(codes, self.n_partitions)
        todo = [p for p, idx in enumerate(rows) if len(idx)] or [0]
        for p in todo:
            yield from self._parts[p].map_chunks(fn, codes[rows[p]], chunk)


def gather_states(layout: StateLayout, n: int, parts) -> np.ndarray:
    """States of n rows from (row indices, their states) per partition (rows absent stay empty)."""
    out = layout.empty(n)
    for idx, st in parts:
        out[idx] = st
    return out


def gather_frame(layout: StateLayout, n: int, parts) -> FeatureFrame:
    """A FeatureFrame of n rows from (row indices, (values, missing, feature_ts)) per partition,
    the partitions together covering every row: the partitioned engines' (local and Ray) answer."""
    n_cols = len(layout.columns)
    values = np.empty((n, n_cols), dtype=np.float64)
    missing = np.empty((n, n_cols), dtype=bool)
    fts = np.empty(n, dtype=np.int64)
    for idx, (v, m, f) in parts:
        values[idx], missing[idx], fts[idx] = v, m, f
    return FeatureFrame(columns=layout.columns, values=values, missing=missing, feature_ts=fts)
