"""Erasing one user everywhere, and retiring a feature set.

A user's events also shaped other entities' aggregates (an item's play count includes
theirs), so erasure does not stop at the user's own keys: every other entity the user's
events touched is recomputed from the cleaned log, leaving no trace of the user in any
value the store serves.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from features.batch import BatchEngine
from features.definitions import FeatureSet
from features.eventlog import EventLog
from features.lookup import record_keys
from features.materialize import is_retired, retired_key, stored_watermark
from features.offline import OfflineStore
from features.online.base import OnlineStore
from features.served_values import VALUES_SUFFIX, state_writes, values_keys
from features.state import StateLayout

__all__ = ["delete_user", "UserDeletion", "retire_feature_set", "retired_key", "is_retired"]


@dataclass(frozen=True)
class UserDeletion:
    user_id: int
    log_rows_removed: int
    log_partitions_rewritten: list[str]
    offline_rows_removed: int
    online_keys_deleted: int
    online_entities_recomputed: int


def delete_user(
    user_id: int,
    *,
    log: EventLog,
    store: OnlineStore,
    sets: Sequence[FeatureSet],
    offline: OfflineStore | None = None,
    reason: str,
    actor: str = "cli",
) -> UserDeletion:
    if not reason.strip():
        raise ValueError("reason must say why the user's data is erased (it goes into the audit log)")
    uid = int(user_id)
    theirs = log.read(user_ids=[uid])
    report = log.delete_user(uid, reason=reason, actor=actor)
    offline_removed = offline.delete_user(uid) if offline is not None else 0
    deleted = 0
    recomputed = 0
    cleaned = None
    for fs in sets:
        if fs.entity.keys[0] == "user_id":
            if fs.entity.is_pair:
                deleted += store.delete_matching(fs.name, entity_type=fs.entity.name, entity_prefix=f"{uid}|")
            else:
                deleted += store.delete(record_keys(fs, [uid]) + values_keys(record_keys(fs, [uid])))  # keys, values records included
            continue
        touched = np.unique(fs.entity.codes(theirs.take(np.flatnonzero(fs.event_mask(theirs))))[0])
        if len(touched) == 0:
            continue
        if cleaned is None:
            cleaned = log.read()
        until = stored_watermark(store, fs)
        if until is None:
            mx = cleaned.ts.max() if len(cleaned) else -1
            until = int(mx) + 1
        lay = StateLayout(fs)
        states = BatchEngine(lay, cleaned).states_asof(touched, np.full(len(touched), until, dtype=np.int64))
        has = states["feature_ts"] >= 0
        keys = record_keys(fs, touched)
        gone = [k for k, h in zip(keys, has) if not h]
        store.delete(gone + values_keys(gone))
        store.commit(state_writes(lay, [k for k, h in zip(keys, has) if h], states[has]))
        recomputed += int(has.sum())
    return UserDeletion(uid, report.rows_removed, list(report.partitions_rewritten), offline_removed, deleted, recomputed)


def retire_feature_set(fs: FeatureSet, store: OnlineStore, offline: OfflineStore | None = None) -> int:
    """Stop materialising a set version and delete its keys; returns keys deleted."""
    store.set_meta(retired_key(fs), json.dumps({"at_ms": int(time.time() * 1000)}))
    n = store.delete_matching(fs.name, version=fs.version)
    store.delete_matching(fs.name, version=fs.version + VALUES_SUFFIX)
    if offline is not None:
        offline.retire(fs)
    return n
