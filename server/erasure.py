"""Erasing one user everywhere Parity keeps them, in one call, with an audit record.

Where a user lives: the event log and the offline views (features.deletion rewrites them and
recomputes every other entity the user's events shaped, so no aggregate keeps a trace), the
online store (their feature records, their seen record, their rate-limit counters), the
served log and its feedback log (rewritten without their rows), a running server's caches
(the service drops them itself: `RecommenderService.delete_user`), and the device bundles:
the event log's deletion audit is what the next `parity export delta` reads to delete their
files and tombstone their token. The audit record names every store touched and how much
went, never the data itself.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from features.contribution import ContributionLimiter
from features.definitions import FeatureSet
from features.deletion import delete_user
from features.eventlog import EventLog
from features.offline import OfflineStore
from features.online.base import OnlineStore
from monitor.erase import erase_user_from_logs
from server.seen import seen_key

__all__ = ["ErasureReport", "erase_user", "write_audit", "ERASURE_AUDIT"]

ERASURE_AUDIT = "_audit/erasures.jsonl"  # under the event log's folder


@dataclass(frozen=True)
class ErasureReport:
    audit_id: str
    user_id: int
    log_rows_removed: int
    offline_rows_removed: int
    online_keys_deleted: int
    online_entities_recomputed: int
    seen_records_deleted: int
    counters_deleted: int
    served_log_rows_removed: int
    feedback_rows_removed: int
    served_log_parts_in_progress: int
    cache_entries_dropped: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def erase_user(user_id: int, *, reason: str, actor: str, log: EventLog, store: OnlineStore, sets: Sequence[FeatureSet],
               offline: OfflineStore | None = None, served_log: str | os.PathLike[str] | None = None, audit: bool = True) -> ErasureReport:
    """Everything but a server's caches (the caller drops those, then writes the audit record
    itself with `write_audit`: audit=False). Idempotent: a second call finds nothing and says
    so. `served_log`: its writers must have finished their parts."""
    uid = int(user_id)
    d = delete_user(uid, log=log, store=store, sets=sets, offline=offline, reason=reason, actor=actor)
    seen = store.delete([seen_key(uid)])
    counters = store.delete_counters(ContributionLimiter(store).user_counters(uid))
    logs = erase_user_from_logs(served_log, uid) if served_log is not None else None
    rep = ErasureReport(uuid.uuid4().hex[:16], uid, d.log_rows_removed, d.offline_rows_removed, d.online_keys_deleted,
                        d.online_entities_recomputed, seen, counters, logs.served_rows_removed if logs else 0,
                        logs.feedback_rows_removed if logs else 0, logs.inprogress_parts if logs else 0)
    if audit:
        write_audit(log, rep, reason, actor)
    return rep


def write_audit(log: EventLog, rep: ErasureReport, reason: str, actor: str) -> None:
    path = Path(log.root) / ERASURE_AUDIT
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"at_ms": int(time.time() * 1000), "reason": reason, "actor": actor, **rep.to_json()}, sort_keys=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
