"""Erasing a user leaves no trace: log, offline views, online keys, and other entities'
aggregates all look as if the user never existed. Retiring a set removes its keys."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from features.deletion import delete_user, is_retired, retire_feature_set
from features.eventlog import EventLog
from features.materialize import materialize
from features.offline import OfflineStore
from features.online.memory import MemoryStore
from features.repo import feature_sets

SETS = feature_sets("simulated", 20)


def _busy_user(log: EventLog) -> int:
    ev = log.read()
    users, counts = np.unique(ev.user_id, return_counts=True)
    return int(users[np.argmax(counts)])


def _snapshot(store) -> dict:
    keys = sorted(store.iter_keys(), key=lambda k: (k.feature_set, k.entity_id))
    return dict(zip(keys, store.get_many(keys)))


def test_deleting_a_user_leaves_no_trace_anywhere(sim_copy, tmp_path, online_store):
    log = EventLog(sim_copy / "events")
    offline = OfflineStore(sim_copy / "offline")
    offline.build(log, SETS)
    uid = _busy_user(log)
    # A world where the user never existed, built independently for comparison.
    twin = tmp_path / "twin"
    shutil.copytree(sim_copy / "events", twin)
    twin_log = EventLog(twin)
    materialize(log, online_store, SETS)
    twin_log.delete_user(uid, reason="build the reference")
    ref = MemoryStore(online_store.namespace)
    materialize(twin_log, ref, SETS, until_ts=log.max_ts() + 1)

    rep = delete_user(uid, log=log, store=online_store, sets=SETS, offline=offline, reason="GDPR request 17")
    assert rep.log_rows_removed > 0 and rep.offline_rows_removed > 0 and rep.online_keys_deleted > 0
    assert rep.online_entities_recomputed > 0  # items, creators' pairs... touched by the user
    assert len(log.read(user_ids=[uid])) == 0
    for fs in SETS:
        assert uid not in set(offline.events(fs).user_id.tolist())
    ids = {k.entity_id for k in online_store.iter_keys()}
    assert str(uid) not in ids and not any(i.startswith(f"{uid}|") for i in ids)
    assert _snapshot(online_store) == _snapshot(ref)  # item aggregates no longer count the user
    audit = log.audit_records()[-1]
    assert audit["user_id"] == uid and audit["reason"] == "GDPR request 17"


def test_deletion_needs_a_reason(sim_copy):
    with pytest.raises(ValueError, match="reason"):
        delete_user(1, log=EventLog(sim_copy / "events"), store=MemoryStore(), sets=SETS, reason=" ")


def test_retiring_a_feature_set_deletes_its_keys_and_stops_materialisation(sim_copy):
    log = EventLog(sim_copy / "events")
    store = MemoryStore()
    offline = OfflineStore(sim_copy / "offline")
    offline.build(log, SETS)
    materialize(log, store, SETS)
    fs = SETS[2]
    n = retire_feature_set(fs, store, offline)
    assert n > 0 and is_retired(store, fs)
    assert not any(k.feature_set == fs.name for k in store.iter_keys())
    assert not offline.has(fs)
    assert json.loads(store.get_meta(f"retired:{fs.name}:{fs.version}"))["at_ms"] > 0
    again = materialize(log, store, SETS, full=True)
    assert [r.mode for r in again if r.feature_set == fs.name] == ["retired"]
    assert not any(k.feature_set == fs.name for k in store.iter_keys())
