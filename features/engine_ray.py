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

A worker that dies (its process killed, its node lost) takes its partitions' engines with it.
Every call the driver makes is a read of an engine (build, states, features, a materialisation
chunk's record bytes), so it can be made again: the driver starts a replacement actor in the
dead one's place, rebuilds the partitions that lived there from the log it still holds (on
first use, for every feature set's engine), and repeats the call, at most `max_recoveries`
times per call. The answers are the same bytes; the engine counts its `recoveries`.

Nothing outside features/ runs on the workers, so with an address the `features` package is
shipped to the cluster (runtime_env py_modules): workers run the driver's code.
"""
from __future__ import annotations

import itertools
import logging
import warnings
from pathlib import Path

import numpy as np

from features.batch import BatchEngine
from features.engines import gather_frame, gather_states
from features.events import EventBatch
from features.partition import split_by_partition
from features.state import FeatureFrame, StateLayout

__all__ = ["RayEngine", "RayBatchEngine", "DEFAULT_PARTITIONS_PER_WORKER", "DEFAULT_MAX_RECOVERIES"]

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS_PER_WORKER = 2  # k: P = workers x k, so a slow partition does not hold a whole worker's share
DEFAULT_MAX_RECOVERIES = 3  # replacement actors per call before its error is raised
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
    partitions_per_worker: k in P = workers x k.
    max_recoveries: replacement actors one call may start when its worker dies (0: none)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, workers: int | None = None,
                 partitions_per_worker: int = DEFAULT_PARTITIONS_PER_WORKER, num_cpus: int = 2,
                 max_recoveries: int = DEFAULT_MAX_RECOVERIES) -> None:
        import ray

        for opt, v in (("partitions_per_worker", partitions_per_worker), ("num_cpus", num_cpus)) + ((("workers", workers),) if workers is not None else ()):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{opt} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{opt} must be >= 1, got {v}")
        if not isinstance(max_recoveries, int) or isinstance(max_recoveries, bool) or max_recoveries < 0:
            raise ValueError(f"max_recoveries must be an int >= 0, got {max_recoveries!r}")
        self.max_recoveries = max_recoveries
        self.recoveries = 0  # replacement actors started
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
        self._actor_cls = ray.remote(_Partitions)
        self._actors = [self._new_actor() for _ in range(workers)]
        self.generations = [0] * workers  # per worker slot: how many times its actor was replaced
        self._ids = itertools.count()

    def _new_actor(self):
        return self._actor_cls.options(scheduling_strategy="SPREAD").remote()

    def actor_of(self, p: int):
        return self._actors[p % self.workers]

    def generation_of(self, p: int) -> int:
        return self.generations[p % self.workers]

    def replace(self, p: int, generation: int, cause: BaseException) -> None:
        """Partition p's worker died during a call made at `generation`: start its replacement
        (once, however many callers saw the death). The replacement holds no engines; each
        RayBatchEngine rebuilds its partitions there on first use."""
        w = p % self.workers
        if self.generations[w] != generation:
            return  # already replaced since that call was made
        self._actors[w] = self._new_actor()
        self.generations[w] += 1
        self.recoveries += 1
        log.warning("ray engine: worker %d died (%s); started a replacement (%d so far), its partitions are rebuilt on use",
                    w, type(cause).__name__, self.recoveries)

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
        self._source = events  # the caller's log, held to rebuild a partition whose worker died
        parts = self._partitions()
        self._built: list = [None] * ray_engine.n_partitions  # per partition: (worker generation, build ref)
        for p, part in enumerate(parts):
            self._build(p, part)
        self._entities: np.ndarray | None = None

    def _partitions(self) -> list[EventBatch]:
        """The set's events of each partition (deduplicated on the whole log: a duplicate id's
        first occurrence may be another entity's)."""
        fs = self.layout.feature_set
        events = self._source.deduplicated()
        ev = events.take(np.flatnonzero(fs.event_mask(events)))
        return [ev.take(idx) for idx in split_by_partition(fs.entity.codes(ev)[0], self._eng.n_partitions)]

    def _build(self, p: int, part: EventBatch) -> None:
        self._built[p] = (self._eng.generation_of(p), self._eng.actor_of(p).build.remote(self._key, p, self.layout, part))

    def _current(self, todo: list[int]) -> None:
        """Rebuild the partitions in `todo` whose worker was replaced since they were built."""
        stale = [p for p in todo if self._built[p][0] != self._eng.generation_of(p)]
        if stale:
            parts = self._partitions()
            for p in stale:
                self._build(p, parts[p])

    def _get(self, p: int, ref, submit):
        """ray.get(ref) of a call on partition p; if its worker died, replace the worker, rebuild
        the partition there and `submit()` the call again (`max_recoveries` times at most)."""
        from ray.exceptions import RayActorError

        for attempt in range(self._eng.max_recoveries + 1):
            gen = self._built[p][0]
            try:
                self._eng._ray.get(self._built[p][1])  # the partition's engine (a build error raises here)
                return self._eng._ray.get(ref)
            except RayActorError as exc:
                if attempt == self._eng.max_recoveries:
                    raise
                self._eng.replace(p, gen, exc)
                self._current([p])
                ref = submit()
        raise AssertionError("unreachable")

    @property
    def entities(self) -> np.ndarray:
        """Every entity with events, sorted (the union of the partitions' disjoint entities)."""
        if self._entities is None:
            got = [self._get(p, self._built[p][1], lambda p=p: self._built[p][1]) for p in range(len(self._built))]
            self._entities = np.sort(np.concatenate(got))
        return self._entities

    def _ready(self) -> None:
        """Wait for the partitions' engines (raising a build's error here, not as a missing engine)."""
        _ = self.entities

    def _routed(self, method: str, codes: np.ndarray, t: np.ndarray):
        self._ready()
        codes = np.asarray(codes, dtype=np.int64)
        t = np.broadcast_to(np.asarray(t, dtype=np.int64), codes.shape)
        rows = split_by_partition(codes, self._eng.n_partitions)
        todo = [p for p, idx in enumerate(rows) if len(idx)]
        self._current(todo)

        def submit(p: int):
            idx = rows[p]
            return getattr(self._eng.actor_of(p), method).remote(self._key, p, codes[idx], np.ascontiguousarray(t[idx]))

        calls = [(p, submit(p)) for p in todo]
        return [(rows[p], self._get(p, ref, lambda p=p: submit(p))) for p, ref in calls]

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
        self._current(todo)

        def submit(p: int):
            return self._eng.actor_of(p).map_chunks.remote(self._key, p, fn, codes[rows[p]], chunk)

        refs = [(p, submit(p)) for p in todo]
        for p, ref in refs:
            yield from self._get(p, ref, lambda p=p: submit(p))

    def close(self) -> None:
        """Free the partitions' engines on the actors (they also go when the RayEngine closes)."""
        from ray.exceptions import RayActorError

        for a in self._eng._actors:
            try:
                self._eng._ray.get(a.drop.remote(self._key))
            except RayActorError:  # a dead worker holds nothing to free
                pass
