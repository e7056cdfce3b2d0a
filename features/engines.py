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
from features.state import FeatureFrame, StateLayout

__all__ = ["ENGINES", "Engine", "SetEngine", "EngineUnavailable", "LocalEngine", "LOCAL", "open_engine"]

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


class LocalEngine:
    """The single process: `BatchEngine` as it always was."""

    name = "local"

    def batch_engine(self, layout: StateLayout, events: EventBatch) -> BatchEngine:
        return BatchEngine(layout, events)

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
