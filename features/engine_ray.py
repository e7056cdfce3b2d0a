"""The batch path on Ray: each feature set's events split by entity hash over worker actors.

`RayEngine` connects to a cluster (joins `address`, or starts a local one) and starts one
actor per worker (default: one per CPU, spread over the nodes). `batch_engine(layout, events)`
deduplicates the log on the driver (first occurrence of an event id, as `BatchEngine` does:
it must see the whole log), keeps the set's events, and splits them with
`features.partition` into P = workers x k partitions; partition p's `BatchEngine` is built on
actor p mod workers and stays there. Because an entity's whole history is in one partition
and every per-entity quantity of the batch engine depends on that history only, a
partition's engine gives its entities the very bytes the single-process engine gives them.

Queries are routed the same way: the rows of `states_asof` / `features_asof` go to the
partition of their entity code and are put back in the caller's row order, so the answers
are the same arrays in the same order. `map_chunks(fn, codes, chunk)` (materialisation)
runs `fn` on the actor where each partition lives and yields its results partition by
partition, in partition order: the driver writes partition p while the actors compute the
next ones. The driver, not the actors, writes to the online store: the memory store lives in
the driver's process, and the watermark must move with the last commit after every record
(see features.materialize); the actors return record bytes (the heavy work: states and
served values), the driver only adds keys and commits.

Nothing outside features/ runs on the workers, so with an address the `features` package is
shipped to the cluster (runtime_env py_modules): workers run the driver's code.
"""
from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np

from features.batch import BatchEngine
from features.engines import gather_frame, gather_states
from features.events import EventBatch
from features.partition import split_by_partition
from features.state import FeatureFrame, StateLayout

__all__ = ["RayEngine", "RayBatchEngine", "DEFAULT_PARTITIONS_PER_WORKER"]

DEFAULT_PARTITIONS_PER_WORKER = 2  # k: P = workers x k, so a slow partition does not hold a whole worker's share
_LOCAL_OBJECT_STORE_BYTES = 1 << 30  # a local cluster's shared-memory object store (Ray's default takes 30 % of RAM)


class _Partitions:
    """One worker's partitions: a `BatchEngine` per (feature-set engine id, partition)."""

    def __init__(self) -> None:
        self.engines: dict[tuple[int, int], BatchEngine] = {}

    def build(self, key: int, p: int, layout: StateLayout, events: EventBatch) -> np.ndarray:
        eng = self.engines[(key, p)] = BatchEngine(layout, events)
        return eng.entities

    def states_asof(self, key: int, p: int, codes: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self.engines[(key, p)].states_asof(codes, t)

    def features_asof(self, key: int, p: int, codes: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fr = self.engines[(key, p)].features_asof(codes, t)
        return fr.values, fr.missing, fr.feature_ts

    def map_chunks(self, key: int, p: int, fn, codes: np.ndarray, chunk: int) -> list:
        return list(self.engines[(key, p)].map_chunks(fn, codes, chunk))

    def drop(self, key: int) -> int:
        gone = [k for k in self.engines if k[0] == key]
        for k in gone:
            del self.engines[k]
        return len(gone)


class RayEngine:
    """A connection to a Ray cluster and its worker actors (close it, or use it as a context).

    address: join this running cluster (`ray start --head` prints it); None starts a local
    cluster with `num_cpus` CPUs (shut down again on close). If Ray is already initialised in
    this process (a test's cluster), that connection is used and left open on close.
    workers: actors to start (default: one per CPU of the cluster), spread over the nodes.
    partitions_per_worker: k in P = workers x k."""

    name = "ray"

    def __init__(self, address: str | None = None, *, workers: int | None = None,
                 partitions_per_worker: int = DEFAULT_PARTITIONS_PER_WORKER, num_cpus: int = 2) -> None:
        import ray

        for opt, v in (("partitions_per_worker", partitions_per_worker), ("num_cpus", num_cpus)) + ((("workers", workers),) if workers is not None else ()):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{opt} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{opt} must be >= 1, got {v}")
        self._ray = ray
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            root = str(Path(__file__).resolve().parent)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about accelerator env vars (no GPUs here)
                if address is not None:
                    ray.init(address=address, runtime_env={"py_modules": [root]}, configure_logging=False, log_to_driver=False)
                else:
                    # no dashboard, so no metrics agent: without the flag each worker logs that it cannot reach one
                    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=_LOCAL_OBJECT_STORE_BYTES,
                             configure_logging=False, log_to_driver=False, _system_config={"enable_metrics_collection": False},
                             runtime_env={"env_vars": {"PYTHONPATH": str(Path(root).parent)}})
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if workers is None:
            workers = max(cpus, 1)
        elif workers > max(cpus, 1):
            self.close()
            raise ValueError(f"workers must be <= the cluster's {cpus} CPUs, got {workers}")
        self.workers = workers
        self.n_partitions = workers * partitions_per_worker
        # Ray's default for actors: a CPU to be placed, none held while alive, so the engine's
        # idle actors never starve other work (or a second engine) on a shared cluster
        actor = ray.remote(_Partitions)
        self._actors = [actor.options(scheduling_strategy="SPREAD").remote() for _ in range(workers)]
        self._ids = itertools.count()

    def actor_of(self, p: int):
        return self._actors[p % self.workers]

    def batch_engine(self, layout: StateLayout, events: EventBatch) -> "RayBatchEngine":
        return RayBatchEngine(self, layout, events, next(self._ids))

    def close(self) -> None:
        ray = self._ray
        for a in getattr(self, "_actors", ()):
            ray.kill(a)
        self._actors = []
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RayBatchEngine:
    """`BatchEngine`'s calls for one feature set, answered by its partitions' engines."""

    def __init__(self, ray_engine: RayEngine, layout: StateLayout, events: EventBatch, key: int) -> None:
        self._eng, self.layout, self._key = ray_engine, layout, key
        fs = layout.feature_set
        events = events.deduplicated()  # on the whole log: a duplicate id's first occurrence may be another entity's
        ev = events.take(np.flatnonzero(fs.event_mask(events)))
        parts = split_by_partition(fs.entity.codes(ev)[0], ray_engine.n_partitions)
        self._built = [ray_engine.actor_of(p).build.remote(key, p, layout, ev.take(idx)) for p, idx in enumerate(parts)]
        self._entities: np.ndarray | None = None

    @property
    def entities(self) -> np.ndarray:
        """Every entity with events, sorted (the union of the partitions' disjoint entities)."""
        if self._entities is None:
            self._entities = np.sort(np.concatenate(self._eng._ray.get(self._built)))
        return self._entities

    def _ready(self) -> None:
        """Wait for the partitions' engines (raising a build's error here, not as a missing engine)."""
        _ = self.entities

    def _routed(self, method: str, codes: np.ndarray, t: np.ndarray):
        self._ready()
        codes = np.asarray(codes, dtype=np.int64)
        t = np.broadcast_to(np.asarray(t, dtype=np.int64), codes.shape)
        rows = split_by_partition(codes, self._eng.n_partitions)
        calls = [(idx, getattr(self._eng.actor_of(p), method).remote(self._key, p, codes[idx], np.ascontiguousarray(t[idx])))
                 for p, idx in enumerate(rows) if len(idx)]
        return [(idx, self._eng._ray.get(ref)) for idx, ref in calls]

    def states_asof(self, codes: np.ndarray, t: np.ndarray) -> np.ndarray:
        """State per row as of t[i], in the rows' order (`BatchEngine.states_asof`)."""
        return gather_states(self.layout, len(codes), self._routed("states_asof", codes, t))

    def features_asof(self, codes: np.ndarray, t: np.ndarray, chunk: int = 32_768) -> FeatureFrame:
        """Feature values per (entity, t) row, in the rows' order (`BatchEngine.features_asof`)."""
        return gather_frame(self.layout, len(codes), self._routed("features_asof", codes, t))

    def map_chunks(self, fn, codes: np.ndarray, chunk: int):
        """fn(partition engine, chunk of its codes) on the partitions' actors, yielded partition by
        partition in partition order (chunks of one partition in the codes' order); at least one."""
        self._ready()
        codes = np.asarray(codes, dtype=np.int64)
        rows = split_by_partition(codes, self._eng.n_partitions)
        todo = [p for p, idx in enumerate(rows) if len(idx)] or [0]
        refs = [self._eng.actor_of(p).map_chunks.remote(self._key, p, fn, codes[rows[p]], chunk) for p in todo]
        for ref in refs:
            yield from self._eng._ray.get(ref)

    def close(self) -> None:
        """Free the partitions' engines on the actors (they also go when the RayEngine closes)."""
        self._eng._ray.get([a.drop.remote(self._key) for a in self._eng._actors])
