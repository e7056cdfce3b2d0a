"""The batch path's partitioning rule (features/partition.py): every event in exactly one
partition, an entity never split, the same partitions in every process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.definitions import PAIR_SHIFT
from features.partition import entity_hash, partition_of, split_by_partition
from features.repo import USER_CREATOR, USER_TOPIC, feature_sets

ROOT = Path(__file__).resolve().parents[2]


def _codes(seed: int = 0, n: int = 20_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 5_000, n)
    topics = rng.integers(0, 20, n)
    pairs = (users << PAIR_SHIFT) | topics
    return np.concatenate([users, pairs, [-1, -1, 0]])


def test_every_row_lands_in_exactly_one_partition():
    codes = _codes()
    parts = split_by_partition(codes, 7)
    assert len(parts) == 7
    every = np.concatenate(parts)
    assert np.array_equal(np.sort(every), np.arange(len(codes)))  # no row lost, none twice
    for idx in parts:
        assert (np.diff(idx) > 0).all()  # rows keep their order inside a partition


def test_an_entity_is_never_split():
    codes = _codes()
    part = partition_of(codes, 6)
    uniq, inv = np.unique(codes, return_inverse=True)
    first = np.full(len(uniq), -1)
    first[inv[::-1]] = part[::-1]  # the partition of each entity's first row
    assert (part == first[inv]).all()


def test_the_events_of_a_simulated_log_split_by_entity_for_every_feature_set(small_sim):
    from features.eventlog import EventLog

    ev = EventLog(small_sim / "events").read()
    for fs in feature_sets("simulated", 20):
        sub = ev.take(np.flatnonzero(fs.event_mask(ev)))
        codes = fs.entity.codes(sub)[0]
        parts = split_by_partition(codes, 4)
        seen = [set(codes[idx].tolist()) for idx in parts]
        assert sum(len(s) for s in seen) == len(set(codes.tolist())), fs.name  # disjoint entity sets
        assert sum(len(idx) for idx in parts) == len(sub)


def test_partitions_are_the_same_in_another_process_with_another_hash_seed():
    codes = _codes(seed=1, n=2_000)
    code = ("import json, sys, numpy as np; from features.partition import partition_of; "
            "c = np.array(json.loads(sys.stdin.read()), dtype=np.int64); print(json.dumps(partition_of(c, 5).tolist()))")
    outs = []
    for seed in ("1", "12345"):
        p = subprocess.run([sys.executable, "-c", code], input=json.dumps(codes.tolist()), capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        outs.append(json.loads(p.stdout))
    assert outs[0] == outs[1] == partition_of(codes, 5).tolist()


def test_a_code_hashes_alone_as_it_does_in_a_batch():
    codes = _codes(n=300)
    alone = np.array([entity_hash(np.array([c]))[0] for c in codes.tolist()], dtype=np.uint64)
    assert np.array_equal(alone, entity_hash(codes))


@pytest.mark.parametrize("entity", [USER_TOPIC, USER_CREATOR])
def test_pairs_sharing_a_user_spread_over_partitions(entity):
    """A pair code is (user << 32) | second: a rule on the low or high bits alone would put a
    user's pairs (or every pair with one second id) together; the mixed hash spreads them."""
    users = np.repeat(np.arange(500), 20)
    second = np.tile(np.arange(20), 500)
    codes = (users << PAIR_SHIFT) | second
    counts = np.bincount(partition_of(codes, 8), minlength=8)
    assert counts.min() > 0.8 * len(codes) / 8 and counts.max() < 1.2 * len(codes) / 8, counts
    one_user = np.unique(partition_of(codes[:20], 8))
    assert len(one_user) > 1


def test_bad_partition_counts_are_refused():
    with pytest.raises(ValueError, match="n_partitions must be >= 1, got 0"):
        partition_of(np.arange(3), 0)
    with pytest.raises(TypeError, match="n_partitions must be an int"):
        partition_of(np.arange(3), 2.0)
