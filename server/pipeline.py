"""The request path's computation, pure: user features in, ranked items out.

Nothing here awaits or touches the network: `retrieve` and `rank` run on the event loop (by
default; `request_compute=thread` moves them to a worker) on a `Snapshot` and the user's
decoded features.
The stages follow the offline evaluation (pipeline.evaluate) exactly: user features and the
seen record's last items (the engagement history) → user tower → ANN candidates (seen, excluded and unpublished items removed, `retrieve_k` kept) →
every candidate's ranker inputs through `features.assemble.assemble` (for rankers trained on
candidate lists, with the list's retrieval rank and score gap, and the item-item score of the
candidate for the same history) → the int8 student in one
batched call → best first. Serving adds, for cold start and freshness, popular items,
recently published items and new items (not in the release) found by their content
embedding, then a per-creator cap.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from export.candidates import SOURCES, CandidatePolicy, candidate_union
from export.candidates import candidate_scores as shared_candidate_scores
from features.assemble import Block, assemble, retrieval_columns
from features.history import history_row
from server.config import ServerConfig
from server.state import Snapshot
from server.user_features import PairTable, UserFeatures, empty_pair_table

__all__ = ["SOURCES", "Timer", "Candidates", "Ranked", "user_matrix", "user_block", "retrieve", "feature_matrix", "rank", "post_process",
           "recommend", "score_items", "missing_pair_values", "user_history", "candidate_scores"]



@dataclass
class Timer:
    """Per-stage wall time in ms, in the order the stages ran."""

    stages: list[tuple[str, float]] = field(default_factory=list)

    def stage(self, name: str) -> "_Stage":
        """`with timer.stage(name):` times the block (a plain object, not a generator: ~10 per request)."""
        return _Stage(self.stages, name)

    def add(self, name: str, ms: float) -> None:
        self.stages.append((name, ms))


class _Stage:
    __slots__ = ("_stages", "_name", "_t")

    def __init__(self, stages: list[tuple[str, float]], name: str) -> None:
        self._stages, self._name, self._t = stages, name, 0.0

    def __enter__(self) -> None:
        self._t = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self._stages.append((self._name, (time.perf_counter() - self._t) * 1000.0))


@dataclass(frozen=True)
class Candidates:
    ids: np.ndarray  # int64
    source: np.ndarray  # int8 index into SOURCES
    rows: np.ndarray  # item-table rows
    user_emb: np.ndarray | None = None  # (1, dim) the user tower's embedding, when retrieval computed it


@dataclass(frozen=True)
class Ranked:
    ids: np.ndarray
    scores: np.ndarray  # float32
    source: np.ndarray
    inputs: np.ndarray | None = None  # (n, F) the ranker's raw inputs (for the served log and drift)


def user_matrix(snap: Snapshot, uf: UserFeatures) -> np.ndarray:
    """The user tower's input row: the user set's columns, NaN where missing (as in training)."""
    b = user_block(uf)
    return np.ascontiguousarray(b.values[:, _positions(b.names, tuple(snap.runtime.user_columns))])


def user_block(uf: UserFeatures) -> Block:
    """The user set's columns (one value each) as one ranker-input row."""
    names = tuple(uf.columns)
    pairs = [uf.columns[c] for c in names]
    v = np.concatenate([a for a, _ in pairs]).astype(np.float64, copy=False)
    m = np.concatenate([b for _, b in pairs]).astype(bool, copy=False)
    if v.shape != (len(names),) or m.shape != (len(names),):
        raise ValueError(f"a user's features hold one value per column; got {len(v)} values for {len(names)} columns")
    return Block.of(names, v, m)


@functools.lru_cache(maxsize=64)
def _positions(names: tuple[str, ...], wanted: tuple[str, ...]) -> np.ndarray:
    pos = {c: j for j, c in enumerate(names)}
    return np.array([pos[c] for c in wanted], dtype=np.intp)


def user_history(uf: UserFeatures, n: int) -> np.ndarray:
    """The user tower's history row [1, n] (item ids, PAD = -1): the last n items of the seen
    record, which keeps `features.history`'s list, so it equals training's `history_at`."""
    return history_row(uf.seen, n)[None, :]


@functools.lru_cache(maxsize=16)
def _policy(base: CandidatePolicy, quotas: tuple[tuple[str, int], ...]) -> CandidatePolicy:
    return base.for_release(dict(quotas))


def release_policy(base: CandidatePolicy, quotas: Mapping[str, int]) -> CandidatePolicy:
    """The server's policy with the release's quotas (manifest retrieval.candidates) in place of
    its own, as `parity eval` applies them; cached, so a request pays one dict lookup."""
    return _policy(base, tuple(sorted(quotas.items()))) if quotas else base


def retrieve(snap: Snapshot, uf: UserFeatures, exclude: np.ndarray, now_ms: int, cfg: ServerConfig, timer: Timer) -> Candidates:
    """The user tower, then `export.candidates.candidate_union`: the rule the offline eval uses too,
    with the quotas the release chose on validation (`release_policy`)."""
    rt = snap.runtime
    blocked = np.union1d(exclude, uf.seen) if len(uf.seen) else exclude
    with timer.stage("embed"):
        emb = rt.user_embeddings(user_matrix(snap, uf), user_history(uf, rt.history_len))
    policy = release_policy(cfg.candidates, rt.release.meta.candidates)
    hist = user_history(uf, rt.item_item.history_len)[0] if policy.n_item_item and rt.item_item is not None else None
    c = candidate_union(rt, emb, snap.items.catalog, snap.new, blocked, now_ms, policy, exact=cfg.retrieval == "exact",
                        history=hist, stage=timer.stage)
    return Candidates(c.ids, c.source, snap.items.rows(c.ids), emb)


def missing_pair_values(snap: Snapshot, uf: UserFeatures, cand_rows: np.ndarray) -> dict[str, np.ndarray]:
    """Pair sets whose values for these candidates were not prefetched: set -> sorted values to read."""
    out = {}
    topic, creator, _, _ = snap.items.content(cand_rows)
    by_col = {"topic": topic, "creator_id": creator}
    for fs, col in snap.plan.pair_sets:
        if fs.name in uf.pairs and uf.pairs[fs.name].covers(by_col[col]):
            continue
        vals = np.unique(by_col[col])
        out[fs.name] = vals[(vals >= 0) & (vals < (1 << 31))]
    return out


def candidate_scores(snap: Snapshot, user_emb: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Two-tower scores of the candidates (new items by their content embedding)."""
    return shared_candidate_scores(snap.runtime, snap.new, user_emb, ids)


def feature_matrix(snap: Snapshot, uf: UserFeatures, rows: np.ndarray, now_ms: int, extra_pairs: Mapping[str, PairTable] | None = None,
                   retrieval: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """Raw ranker inputs (n, F) for the user and item rows, through the shared `assemble`:
    the user's row, the item table's block (kept per as-of time) and each pair table's block
    are written a block at a time. `retrieval`: the candidate list's retrieval columns, when
    the ranker reads them."""
    spec = snap.runtime.inputs
    topic, creator, duration, publish = snap.items.content(rows)
    cols = {**uf.columns, **retrieval} if retrieval else uf.columns
    blocks = [user_block(uf), snap.items.block(rows, now_ms)]
    by_col = {"topic": topic, "creator_id": creator}
    for fs, col in snap.plan.pair_sets:
        table = (extra_pairs or {}).get(fs.name) or uf.pairs.get(fs.name) or empty_pair_table(fs, now_ms)
        blocks.append(table.block(by_col[col]))
    return assemble(spec, cols, item_topic=topic, item_publish_ts=publish, item_duration_s=duration, request_ts=now_ms, blocks=blocks)


def rank(snap: Snapshot, uf: UserFeatures, cand: Candidates, now_ms: int, timer: Timer, extra_pairs: Mapping[str, PairTable] | None = None) -> Ranked:
    if len(cand.ids) == 0:
        return Ranked(cand.ids, np.empty(0, dtype=np.float32), cand.source)
    with timer.stage("assemble"):
        retrieval = None
        if snap.runtime.inputs.uses_retrieval:  # list-relative rank and score gap (+ item-item), as in training and eval
            rt = snap.runtime
            emb = cand.user_emb if cand.user_emb is not None else rt.user_embeddings(user_matrix(snap, uf), user_history(uf, rt.history_len))
            hist = user_history(uf, rt.item_item.history_len)[0] if rt.item_item is not None else None
            retrieval = retrieval_columns(candidate_scores(snap, emb, cand.ids), cand.ids, hist, rt.item_item)
        X = feature_matrix(snap, uf, cand.rows, now_ms, extra_pairs, retrieval)
    with timer.stage("rank"):
        scores = snap.runtime.final_scores(X)  # ONE batched call of the configured ranker, in the release's order
    return Ranked(cand.ids, scores.astype(np.float32), cand.source, X)


def post_process(ranked: Ranked, creators: np.ndarray, k: int, per_creator_cap: int) -> np.ndarray:
    """Indices of the top k: best score first (ties by item id, as the offline eval), at most
    `per_creator_cap` items per known creator while enough others remain (then backfilled)."""
    order = np.lexsort((ranked.ids, -ranked.scores))
    if per_creator_cap <= 0:
        return order[:k]
    taken, skipped, count = [], [], {}
    for i, c in zip(order.tolist(), np.asarray(creators)[order].tolist()):
        if c >= 0 and count.get(c, 0) >= per_creator_cap:
            skipped.append(i)
            continue
        count[c] = count.get(c, 0) + 1
        taken.append(i)
        if len(taken) == k:
            break
    if len(taken) < k:
        taken += skipped[: k - len(taken)]
    return np.asarray(taken, dtype=np.int64)


def recommend(snap: Snapshot, uf: UserFeatures, exclude: np.ndarray, k: int, now_ms: int, cfg: ServerConfig, timer: Timer,
              cand: Candidates | None = None, extra_pairs: Mapping[str, PairTable] | None = None) -> tuple[Ranked, np.ndarray]:
    """(ranked candidates, indices of the top k). Pass `cand` when retrieval already ran."""
    if cand is None:
        cand = retrieve(snap, uf, exclude, now_ms, cfg, timer)
    ranked = rank(snap, uf, cand, now_ms, timer, extra_pairs)
    with timer.stage("post_process"):
        _, creator, _, _ = snap.items.content(cand.rows)
        top = post_process(ranked, creator, k, cfg.per_creator_cap)
    return ranked, top


def score_items(snap: Snapshot, uf: UserFeatures, item_ids: np.ndarray, now_ms: int, timer: Timer,
                extra_pairs: Mapping[str, PairTable] | None = None) -> Ranked:
    """The given items scored in the given order (Rank): no retrieval, no filtering."""
    cand = Candidates(np.asarray(item_ids, dtype=np.int64), np.full(len(item_ids), 4, dtype=np.int8), snap.items.rows(item_ids))
    return rank(snap, uf, cand, now_ms, timer, extra_pairs)
