"""Retrieval candidate lists of a release at per-user cut times, as the server's ANN stage sees them.

The same steps as `pipeline.evaluate.evaluate_release` stage 1 and the ANN part of its
candidates: the user's features and engagement history as of the cut (point-in-time), the
release's user tower, ANN top-k with the user's engaged items before the cut and items not
in the release or not yet published removed. Also the teacher's input matrix of every
(user, candidate), including the list-relative retrieval columns when the release's rankers
read them, computed as the evaluation computes them. Used for the device ranker's training
lists (MovieLens, cut at the valid start) and for its evaluation (cut at the test start).
numpy + ONNX Runtime only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.candidates import NewItems, candidate_scores
from export.runtime import ReleaseRuntime
from features.assemble import RETRIEVAL_COLUMNS, RankerInputs, retrieval_columns
from features.catalog import ItemCatalog
from features.definitions import FeatureSet
from features.events import EventBatch
from features.history import history_at
from features.item_item import SparseItemItem, sparsify
from export.device.users import user_states
from features.pit import PitJoiner
from models.data import feature_matrix

__all__ = ["ReleaseLists", "release_lists", "teacher_matrix", "device_item_item", "list_item_item"]


@dataclass(frozen=True)
class ReleaseLists:
    users: np.ndarray  # (u,) int64
    cut: np.ndarray  # (u,) int64 ms: each user's "now"
    user_emb: np.ndarray  # (u, d) float32: the release user tower's output (not quantised)
    ids: list[np.ndarray]  # per user, candidate item ids best first (ANN order)

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, item, t) of every candidate, list after list."""
        n = [len(x) for x in self.ids]
        return (np.repeat(self.users, n), np.concatenate(self.ids).astype(np.int64) if n else np.zeros(0, np.int64),
                np.repeat(self.cut, n))


def release_lists(rt: ReleaseRuntime, joiner: PitJoiner, user_set: FeatureSet, events: EventBatch, kind: str,
                  items: ItemCatalog, users: np.ndarray, cut: np.ndarray, k: int = 200) -> ReleaseLists:
    """Each user's list as of the user's cut: `export.device.users.user_states`, the function the
    bundle's user files come from, so training, evaluation and the bundle hold the same lists."""
    st = user_states(rt, events, items, user_set, kind, np.asarray(users, np.int64), np.asarray(cut, np.int64),
                     n_candidates=k, joiner=joiner)
    return ReleaseLists(st.user_ids, np.asarray(st.as_of_ms, np.int64), st.embeddings, [st.candidate_list(r) for r in range(len(st.user_ids))])


def teacher_matrix(rt: ReleaseRuntime, joiner: PitJoiner, used: list[FeatureSet], events: EventBatch, kind: str,
                   items: ItemCatalog, lists: ReleaseLists, new: NewItems | None = None) -> np.ndarray:
    """The release rankers' raw inputs for every candidate of `lists`, with the list-relative
    retrieval columns when the rankers read them: `parity eval` (pipeline.evaluate) ranks with
    exactly these, and so does the device ranker's teacher. `new`: items outside the release,
    scored by their content embedding as the server scores them."""
    cu, ci, ct = lists.rows()
    if not rt.inputs.uses_retrieval:
        return feature_matrix(rt.inputs, joiner, used, items, cu, ci, ct)
    base = RankerInputs(rt.inputs.user_set, rt.inputs.item_set, rt.inputs.pair_sets, rt.inputs.affinity,
                        tuple(c for c in rt.inputs.columns if c not in RETRIEVAL_COLUMNS))
    Xb = feature_matrix(base, joiner, used, items, cu, ci, ct)
    rcols: dict[str, list[np.ndarray]] = {c: [] for c in RETRIEVAL_COLUMNS if c in rt.inputs.columns}
    Hii = history_at(events, kind, lists.users, lists.cut, rt.item_item.history_len) if rt.item_item is not None else None
    for r, ids in enumerate(lists.ids):
        scores = candidate_scores(rt, new, lists.user_emb[r], ids) if new is not None else rt.item_scores(lists.user_emb[r], ids)
        rc = retrieval_columns(scores, ids, Hii[r] if Hii is not None else None, rt.item_item)
        for c in rcols:
            rcols[c].append(np.where(rc[c][1], np.nan, rc[c][0]))
    X = np.empty((len(ci), len(rt.inputs.columns)), dtype=np.float32)
    pos = {c: j for j, c in enumerate(base.columns)}
    for j, c in enumerate(rt.inputs.columns):
        X[:, j] = np.concatenate(rcols[c]) if c in rcols else Xb[:, pos[c]]
    return X


def device_item_item(rt: ReleaseRuntime, k: int = 32) -> SparseItemItem | None:
    """The device's form of the release's item-item model (None when the release has none)."""
    return sparsify(rt.item_item, k) if rt.item_item is not None else None


def list_item_item(model: SparseItemItem, events: EventBatch, kind: str, lists: ReleaseLists) -> np.ndarray:
    """The sparse item-item score of every candidate of `lists` (list after list) for its user's
    history as of the list's cut: the device's `recent` items plus what it recorded since."""
    H = history_at(events, kind, lists.users, lists.cut, model.history_len)
    return np.concatenate([model.scores(H[r], ids) for r, ids in enumerate(lists.ids)]) if lists.ids else np.zeros(0)
