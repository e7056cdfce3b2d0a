"""The batch path's partitioning rule: events split by a stable hash of their entity code.

Every per-entity quantity of the batch engine (tile partials, decayed sums, last values,
hence every state as of t) depends on that entity's own events only, so splitting a feature
set's events by entity puts each entity's whole history in one partition and its fold stays
local: a partition's BatchEngine answers for its entities exactly what the engine over the
whole log answers. Which partition an entity lands in is a pure function of its int64 code
(`Entity.codes`: an id, or (first << 32) | second for a pair): the splitmix64 finaliser, no
Python `hash()` (salted per process for str) and nothing that depends on the run, the
machine or the order of the events. So a partition holds the same entities on every run
and in every process, and a query row is routed to the partition that holds its entity.
"""
from __future__ import annotations

import numpy as np

__all__ = ["entity_hash", "partition_of", "split_by_partition"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def entity_hash(codes: np.ndarray) -> np.ndarray:
    """splitmix64 of each int64 code (uint64): well mixed, so ids in runs or pairs sharing
    a user spread evenly over partitions."""
    z = np.asarray(codes, dtype=np.int64).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += _GOLDEN
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        return z ^ (z >> _S31)


def partition_of(codes: np.ndarray, n_partitions: int) -> np.ndarray:
    """The partition (0 .. n_partitions - 1, int64) of each entity code."""
    if not isinstance(n_partitions, (int, np.integer)) or isinstance(n_partitions, bool):
        raise TypeError(f"n_partitions must be an int, got {type(n_partitions).__name__}")
    if n_partitions < 1:
        raise ValueError(f"n_partitions must be >= 1, got {n_partitions}")
    return (entity_hash(codes) % np.uint64(n_partitions)).astype(np.int64)


def split_by_partition(codes: np.ndarray, n_partitions: int) -> list[np.ndarray]:
    """Row indices per partition, each ascending (the rows keep their order inside a partition):
    every row in exactly one list; the lists' concatenation is a permutation of the rows."""
    part = partition_of(codes, n_partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(n_partitions + 1))
    return [order[bounds[p] : bounds[p + 1]] for p in range(n_partitions)]
