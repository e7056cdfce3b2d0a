"""Per-user device state as of a watermark: the user tower's embedding, retrieval candidates,
recently engaged items. Vectorised over users (batches), torch-free.

The embedding is the release's user tower on the user's features and engagement history as
of the watermark, exactly as `parity eval` and the server compute it (point-in-time join of
the user set, `features.history.history_at`). Candidates are the release's ANN top-N with
the server's eligibility rule: never an item the user engaged with before the watermark,
never one not yet published, only items of the release.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from export.runtime import ReleaseRuntime
from features.assemble import columns_from_join
from features.catalog import ItemCatalog
from features.definitions import FeatureSet
from features.events import EventBatch
from features.history import engagement_mask, history_at
from features.pit import PitJoiner
from features.sorted_lookup import sorted_positions

__all__ = ["UserStates", "user_states", "N_CANDIDATES", "N_RECENT"]

N_CANDIDATES = 200  # the server's retrieve_k
N_RECENT = 50  # recently engaged items the device filters out


@dataclass(frozen=True)
class UserStates:
    user_ids: np.ndarray  # (n,) int64
    embeddings: np.ndarray  # (n, d) float32
    candidates: np.ndarray  # (n, N) int64, best first, -1 padded
    recent: np.ndarray  # (n, M) int64, most recent last, -1 padded in front
    as_of_ms: int | np.ndarray  # one time for all, or each user's

    def candidate_list(self, r: int) -> np.ndarray:
        c = self.candidates[r]
        return c[c >= 0]

    def recent_list(self, r: int) -> np.ndarray:
        c = self.recent[r]
        return c[c >= 0]


def _seen_keys(events: EventBatch, kind: str, as_of: np.ndarray, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted user<<32|item keys of engaged pairs before each user's as_of, engaged-item count per user)."""
    pos = sorted_positions(user_ids, events.user_id)
    mine = user_ids[pos] == events.user_id
    m = engagement_mask(events, kind) & mine & (events.ts < as_of[pos])
    keys = np.unique((events.user_id[m].astype(np.int64) << 32) | events.item_id[m].astype(np.int64))
    per_user = np.bincount(np.searchsorted(user_ids, keys >> 32), minlength=len(user_ids)) if len(keys) else np.zeros(len(user_ids), np.int64)
    return keys, per_user


def user_states(rt: ReleaseRuntime, events: EventBatch, items: ItemCatalog, user_set: FeatureSet, kind: str, user_ids: np.ndarray,
                as_of: int | np.ndarray, *, n_candidates: int = N_CANDIDATES, n_recent: int = N_RECENT, batch: int = 4096,
                joiner: PitJoiner | None = None) -> UserStates:
    """`as_of`: one time for every user, or one per user of `user_ids` (then they must be unique)."""
    raw = np.asarray(user_ids, dtype=np.int64)
    if np.ndim(as_of) == 0:
        users = np.unique(raw)
        t_user = np.full(len(users), int(as_of), dtype=np.int64)
    else:
        order = np.argsort(raw, kind="stable")
        users, t_user = raw[order], np.asarray(as_of, dtype=np.int64)[order]
        if len(users) > 1 and not (np.diff(users) > 0).all():
            raise ValueError("per-user times need unique user ids")
    d = rt.item_embeddings.shape[1]
    n = len(users)
    emb = np.zeros((n, d), dtype=np.float32)
    cand = np.full((n, n_candidates), -1, dtype=np.int64)
    if n == 0:
        return UserStates(users, emb, cand, np.full((0, n_recent), -1, np.int64), as_of)
    joiner = joiner or PitJoiner([user_set], events)
    seen, n_seen = _seen_keys(events, kind, t_user, users)
    pub = np.full(len(rt.vocab), np.iinfo(np.int64).max, dtype=np.int64)  # release items not in the catalogue: never eligible
    row = items.index(rt.vocab)
    pub[row >= 0] = items.publish_ts[row[row >= 0]]
    vocab_pos = np.argsort(rt.vocab)
    sorted_vocab = rt.vocab[vocab_pos]
    recent = history_at(events, kind, users, t_user, n_recent)
    hist = history_at(events, kind, users, t_user, rt.history_len) if rt.history_len else None
    for a in range(0, n, batch):
        u = users[a:a + batch]
        t = t_user[a:a + batch]
        cols = columns_from_join(joiner.join(pa.table({"user_id": u, "ts": t}), only=[user_set.name]), [user_set])
        U = np.stack([np.where(cols[c][1], np.nan, cols[c][0]) for c in rt.user_columns], axis=1).astype(np.float32)
        e = rt.user_embeddings(U, hist[a:a + batch] if hist is not None else None)
        emb[a:a + batch] = e
        want = int(min(len(rt.vocab), n_candidates + int(n_seen[a:a + batch].max()) + 50))
        ids, _ = rt.retrieve(e, want)
        key = (u[:, None] << 32) | ids
        pos = sorted_positions(seen, key)
        is_seen = (seen[pos] == key) if len(seen) else np.zeros(ids.shape, bool)
        ids_pub = pub[vocab_pos[sorted_positions(sorted_vocab, ids)]]
        ok = ~is_seen & (ids_pub < t[:, None]) & (ids >= 0)
        rank = np.cumsum(ok, axis=1) - 1
        keep = ok & (rank < n_candidates)
        r, c = np.nonzero(keep)
        cand[a + r, rank[r, c]] = ids[r, c]
    return UserStates(users, emb, cand, recent, as_of if np.ndim(as_of) == 0 else t_user)
