"""Erasure notices: a DeleteUser that one worker ran reaches every other worker's memory.

The erasure itself works on what workers share (the event log, the online store, the finished
served-log parts), but each worker also holds the user in memory: its feature cache, its
last-good records, its response cache, and the served-log part it is still writing. Those are
per process, so the worker that erased the user publishes a notice in the online store and
every worker polls it (`rollout_poll_s`, as it polls the rollout) and forgets the user itself.

The notices are one metadata value (JSON: a sequence number and the most recent `KEEP`
notices), updated in the store's transaction, so two workers erasing at once both land. A
worker that fell more than `KEEP` notices behind (asleep, partitioned) cannot know whom it
missed and forgets everyone (`missed_some`): erasure must never depend on a worker keeping up.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from features.online.base import Commit, OnlineStore, Snapshot

__all__ = ["ErasureNotices", "Notices", "KEEP"]

KEEP = 1000


@dataclass(frozen=True)
class Notices:
    seq: int  # the latest notice's number (0: none ever)
    users: tuple[int, ...]  # users erased after the asked-for number, oldest first
    missed_some: bool  # older notices than the kept ones were asked for: forget everyone


class ErasureNotices:
    def __init__(self, store: OnlineStore, name: str = "erasures:recent") -> None:
        self.store = store
        self.name = name

    @staticmethod
    def _parse(raw: str | None) -> tuple[int, list[list[int]]]:
        if raw is None:
            return 0, []
        d = json.loads(raw)
        return int(d["seq"]), [[int(s), int(u)] for s, u in d["recent"]]

    def publish(self, user_id: int) -> int:
        """Record that `user_id` was erased; returns the notice's number."""
        out: list[int] = []

        def decide(snap: Snapshot) -> Commit:
            seq, recent = self._parse(snap.meta.get(self.name))
            seq += 1
            recent = [*recent, [seq, int(user_id)]][-KEEP:]
            out[:] = [seq]
            return Commit(meta={self.name: json.dumps({"seq": seq, "recent": recent}, separators=(",", ":"))})

        self.store.transact([], [], [self.name], decide)
        return out[0]

    def since(self, seq: int) -> Notices:
        """The notices after number `seq` (a worker's last one seen)."""
        latest, recent = self._parse(self.store.get_meta(self.name))
        if latest <= seq:
            return Notices(latest, (), False)
        oldest = recent[0][0] if recent else latest + 1
        return Notices(latest, tuple(u for s, u in recent if s > seq), seq + 1 < oldest)
