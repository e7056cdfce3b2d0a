"""A loaded release, ready to compute: user embeddings, ANN retrieval, ranking.

The same object serves offline evaluation and the gRPC server, so what `parity eval`
measures is what the server runs. ONNX Runtime and ScaNN only; no torch.

Release layout (paths relative to the release folder):
  rankers/{teacher_fp32,student_fp32,student_int8}.onnx   input "features" [N, F] -> "score" [N]
  retrieval/user_tower.onnx                               "user_features" [N, U], "history" [N, L] -> "embedding"
  retrieval/item_tower.onnx                               item_index, topic, creator_bucket, duration_s -> "embedding"
  retrieval/item_ids.npy, retrieval/item_embeddings.npy   the vocabulary and its embeddings
  retrieval/index/                                        the ScaNN index (export.index)
  retrieval/item_item{,_ids,_indptr,_nbr}.npy             the sparse item-item model, when the rankers read
                                                          retrieval.item_item (export.item_item)
  popularity.json                                         item ids, most popular first

Rankers are scored through `score`; besides the release's ONNX rankers a caller may plug in
a scorer of its own by name (`plugins`): the benchmarks' torch-teacher baseline server uses
this, so the server itself never imports torch.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnxruntime as ort

from export.index import ItemIndex, exact_search
from export.item_item import FILES as ITEM_ITEM_FILES, load_item_item
from export.onnx_export import ort_session
from features.item_inputs import VocabIndex, history_index, item_tower_inputs, load_vocab, vocab_index
from export.release import Release, ReleaseError
from features.assemble import RankerInputs
from features.catalog import ItemCatalog
from features.item_item import ItemItem

__all__ = ["ReleaseRuntime", "RANKERS", "Scorer", "ScorerFactory", "ordered_scores"]

RANKERS = ("teacher_fp32", "student_fp32", "student_int8")

Scorer = Callable[[np.ndarray], np.ndarray]  # raw ranker inputs (N, F) float32 -> scores (N,)
ScorerFactory = Callable[[Release], Scorer]


def ordered_scores(ranker: np.ndarray, item_item: np.ndarray, order: str) -> np.ndarray:
    """The scores of an order (export.manifest.ORDERS) from the ranker's probabilities and the
    rows' retrieval.item_item values (NaN: none): training's validation choice and serving
    compute them here alike. "item_item" maps the item-item score into (1, 2) by a logistic,
    above every probability, and keeps the probability where the row has no item-item score."""
    p = np.asarray(ranker, dtype=np.float32).reshape(-1)
    if order == "ranker":
        return p
    if order != "item_item":
        raise ValueError(f"order must be 'ranker' or 'item_item', got {order!r}")
    ii = np.asarray(item_item, dtype=np.float64).reshape(-1)
    ok = np.isfinite(ii)
    with np.errstate(over="ignore"):
        mapped = 1.0 + 1.0 / (1.0 + np.exp(-np.where(ok, ii, 0.0)))
    return np.where(ok, mapped, p).astype(np.float32)


@dataclass
class ReleaseRuntime:
    release: Release
    inputs: RankerInputs
    user_columns: list[str]
    vocab: np.ndarray
    item_embeddings: np.ndarray
    index: ItemIndex
    popular: np.ndarray
    creator_buckets: int
    history_len: int  # L: the user tower's history width (manifest retrieval.history_len)
    _rankers: dict[str, ort.InferenceSession]
    _user_tower: ort.InferenceSession
    _item_tower: ort.InferenceSession
    _plugins: dict[str, Scorer] = field(default_factory=dict)
    default_ranker: str | None = None
    item_item: ItemItem | None = None  # the ranker's retrieval.item_item model (features.item_item), when it reads one

    @functools.cached_property
    def vocab_lookup(self) -> VocabIndex:
        """`vocab` checked and sorted once (requests map histories through it)."""
        return VocabIndex(self.vocab)

    @classmethod
    def load(cls, release: Release, *, rankers: tuple[str, ...] = RANKERS, threads: int = 1,
             plugins: Mapping[str, ScorerFactory] | None = None) -> "ReleaseRuntime":
        """`rankers`: the ONNX rankers to load (the first is the default of `score`); a name
        that is a key of `plugins` is built by its factory instead."""
        plugins = dict(plugins or {})
        m = release.meta
        inputs = m.ranker_inputs
        if m.retrieval is None:
            raise ReleaseError(f"release {release.release_id} has no retrieval section; it cannot serve")
        sess = lambda rel: ort_session(release.file(rel), threads)  # noqa: E731
        unknown = [r for r in rankers if r not in RANKERS and r not in plugins]
        if unknown:
            raise ReleaseError(f"unknown rankers {unknown}; a release has {RANKERS}")
        emb = np.load(release.file("retrieval/item_embeddings.npy"), allow_pickle=False)
        vocab = load_vocab(release.file("retrieval/item_ids.npy"))
        if len(vocab) != len(emb):
            raise ReleaseError(f"release {release.release_id}: {len(vocab)} item ids but {len(emb)} embeddings")
        pop = np.asarray(json.loads(release.file("popularity.json").read_text())["item_ids"], dtype=np.int64)
        ii_meta = m.retrieval.item_item
        item_item = None
        if ii_meta is not None:
            for name in ITEM_ITEM_FILES:
                release.file("retrieval/" + name)  # present and listed
            item_item = load_item_item(release.path / "retrieval", ii_meta.l2, ii_meta.history_len, ii_meta.neighbours)
        if inputs.uses_item_item and item_item is None:
            raise ReleaseError(f"release {release.release_id}: the rankers read retrieval.item_item but the release has no item-item model")
        return cls(
            release, inputs, list(m.retrieval.user_columns), vocab, emb,
            ItemIndex.load(release.path / "retrieval" / "index", emb), pop, m.retrieval.creator_buckets,
            m.retrieval.history_len,
            {r: sess(f"rankers/{r}.onnx") for r in rankers if r not in plugins}, sess("retrieval/user_tower.onnx"),
            sess("retrieval/item_tower.onnx"), {r: plugins[r](release) for r in rankers if r in plugins}, rankers[0] if rankers else None,
            item_item,
        )

    @property
    def release_id(self) -> str:
        return self.release.release_id

    def user_embeddings(self, user_features: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        """(N, dim) from raw user features [N, U] (NaN = missing) and the users' engagement
        history as item ids [N, L'] (features.history layout: most recent last, PAD = -1;
        the server's seen record through `features.history.history_row`); None = empty."""
        U = np.ascontiguousarray(user_features, dtype=np.float32)
        feeds = {"user_features": U}
        if self.history_len:
            h = np.full((len(U), 0), -1, dtype=np.int64) if history is None else history
            feeds["history"] = history_index(self.vocab_lookup, h, self.history_len)
        return self._user_tower.run(["embedding"], feeds)[0]

    def item_scores(self, user_emb: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """float64 dot products of one user embedding with the release's item embeddings of
        `item_ids` (exact; NaN for ids outside the release vocabulary)."""
        idx = vocab_index(self.vocab_lookup, item_ids) - 1
        e = np.asarray(user_emb, dtype=np.float32).reshape(-1)
        s = (self.item_embeddings[np.maximum(idx, 0)] @ e).astype(np.float64)
        return np.where(idx >= 0, s, np.nan)

    def user_inputs(self, X: np.ndarray) -> np.ndarray:
        """The user tower's columns out of a ranker input matrix."""
        pos = {c: j for j, c in enumerate(self.inputs.columns)}
        return np.ascontiguousarray(X[:, [pos[c] for c in self.user_columns]], dtype=np.float32)

    def content_embeddings(self, catalog: ItemCatalog, item_ids: np.ndarray) -> np.ndarray:
        """Embeddings of items not in the release (new items) from their content alone."""
        feeds = item_tower_inputs(catalog, item_ids, vocab=self.vocab_lookup, n_creator_buckets=self.creator_buckets)
        return self._item_tower.run(["embedding"], feeds)[0]

    def retrieve(self, user_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(item ids (n, k), scores) by approximate dot product."""
        idx, scores = self.index.search(np.ascontiguousarray(user_emb, dtype=np.float32), k)
        return self.vocab[idx], scores

    def retrieve_exact(self, user_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(item ids (n, k), scores) by exact dot product over every item (numpy)."""
        rows, scores = exact_search(self.item_embeddings, np.ascontiguousarray(user_emb, dtype=np.float32), k)
        return self.vocab[rows], scores

    @property
    def order(self) -> str:
        """How the release orders a candidate list (manifest ranking.order, chosen on validation)."""
        return self.release.meta.order

    def final_scores(self, X: np.ndarray, ranker: str | None = None, order: str | None = None) -> np.ndarray:
        """The scores a candidate list is ordered by, in the release's `order` (or `order`):
        "ranker": `score(X, ranker)`; "item_item": the retrieval.item_item column mapped into
        (1, 2) by a logistic (same order), above the ranker's probability in [0, 1], which
        rows without an item-item score keep (a user with no history, an item outside the
        model). Row by row, so a list's order never depends on which rows are beside it."""
        if (order or self.order) != "item_item":
            return self.score(X, ranker)
        ii = np.asarray(X)[:, self._item_item_column]
        need = ~np.isfinite(ii)
        p = np.zeros(len(ii), dtype=np.float32)
        if need.any():  # the ranker only for the rows the order falls back on (none, for a user with a history)
            p[need] = self.score(np.asarray(X)[need], ranker)
        return ordered_scores(p, ii, "item_item")

    @functools.cached_property
    def _item_item_column(self) -> int:
        """Where retrieval.item_item sits in the ranker inputs (found once, not per request)."""
        return self.inputs.columns.index("retrieval.item_item")

    def score(self, X: np.ndarray, ranker: str | None = None) -> np.ndarray:
        """Scores of raw ranker inputs with `ranker` (None: the first ranker loaded)."""
        name = ranker or self.default_ranker or "student_int8"
        X = np.ascontiguousarray(X, dtype=np.float32)
        plugin = self._plugins.get(name)
        if plugin is not None:
            return np.asarray(plugin(X), dtype=np.float32).reshape(-1)
        try:
            s = self._rankers[name]
        except KeyError:
            raise ReleaseError(f"ranker {name!r} not loaded; loaded: {sorted(self._rankers) + sorted(self._plugins)}") from None
        return s.run(["score"], {"features": X})[0].reshape(-1)

    def file_path(self, rel: str) -> Path:
        return self.release.file(rel)
