"""The release manifest as a typed value, parsed once when a release is loaded.

export/manifest_schema.py checks the manifest's shape; this turns the parts that code reads
(the feature-set versions, the ranker inputs, the retrieval section, the files, the
popularity half-life) into frozen dataclasses, so the server's skew guard, the runtime and
the evaluation read attributes instead of string keys scattered over several modules, and a
release missing one of them is refused at load with the field named, never later with a
KeyError in the middle of serving. Free-form parts (metrics, config, libraries) stay as the
JSON they are, under `raw`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from export.manifest_schema import clip
from features.assemble import RankerInputs
from features.item_item import DEFAULT_NEIGHBOURS

__all__ = ["ReleaseManifest", "RetrievalMeta", "ItemItemMeta", "FileEntry", "ManifestError", "ORDERS"]


class ManifestError(ValueError):
    """A manifest field code relies on is missing or of the wrong type (the message names it)."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ItemItemMeta:
    l2: float
    history_len: int
    neighbours: int = DEFAULT_NEIGHBOURS  # each item's regression neighbourhood (features.item_item)


@dataclass(frozen=True)
class RetrievalMeta:
    user_columns: tuple[str, ...]
    creator_buckets: int
    history_len: int
    item_item: ItemItemMeta | None


@dataclass(frozen=True)
class ReleaseManifest:
    release_id: str
    created_at_ms: int
    seed: int
    dataset_kind: str
    feature_set_versions: Mapping[str, str]
    ranker_inputs: RankerInputs
    retrieval: RetrievalMeta | None  # None: a release without retrieval models (not servable)
    files: Mapping[str, FileEntry]
    models: Mapping[str, str]
    profile: str | None
    popularity_half_life_ms: int | None
    reference: Mapping[str, Any] | None  # per-column and prediction histograms (export/reference.py), when recorded
    raw: Mapping[str, Any]
    candidates: Mapping[str, int] = field(default_factory=dict)  # retrieval.candidates: quotas chosen on validation at training
    order: str = "ranker"  # ranking.order: how a candidate list is ordered (ORDERS; export.runtime.ReleaseRuntime.final_scores)

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> "ReleaseManifest":
        """Assumes `manifest_problem(m)` is None (the shape is checked first)."""
        ri = m["ranker_inputs"]
        inputs = RankerInputs(ri["user_set"], ri["item_set"], tuple((p[0], p[1]) for p in ri["pair_sets"]), ri["affinity"], tuple(ri["columns"]))
        versions = {name: fs["version"] for name, fs in m["feature_sets"].items()}
        for name in inputs.sets:
            if name not in versions:
                raise ManifestError(f"ranker_inputs names feature set {clip(name)}, which is not among feature_sets")
        cfg = m["config"]
        profile = cfg.get("profile")
        half = cfg.get("popularity_half_life_ms")
        ref = m.get("reference")
        return cls(m["release_id"], m["created_at_ms"], m["seed"], m["dataset"]["kind"], versions, inputs, _retrieval(m.get("retrieval")),
                   {rel: FileEntry(meta["sha256"], meta["bytes"]) for rel, meta in m["files"].items()}, dict(m["models"]),
                   profile if isinstance(profile, str) else None, _int(half, "config.popularity_half_life_ms", none_ok=True),
                   ref if isinstance(ref, dict) else None, m, _candidates((m.get("retrieval") or {}).get("candidates")),
                   _order(m.get("ranking"), inputs))


# "ranker": the int8 student's probability; "item_item": the item-item model's score of the
# user's history (the ranker's retrieval.item_item input), the ranker only where that is missing
ORDERS = ("ranker", "item_item")


def _order(r: Any, inputs: RankerInputs) -> str:
    if r is None:
        return "ranker"
    order = r.get("order") if isinstance(r, dict) else None
    if order not in ORDERS:
        raise ManifestError(f"ranking.order must be one of {', '.join(ORDERS)}, not {clip(order if isinstance(r, dict) else r)}")
    if order == "item_item" and not inputs.uses_item_item:
        raise ManifestError("ranking.order is item_item but the ranker inputs have no retrieval.item_item column")
    return order


CANDIDATE_QUOTAS = ("retrieve_k", "n_item_item", "n_popular")  # the quotas a release may choose (export.candidates.CandidatePolicy)


def _candidates(c: Any) -> dict[str, int]:
    if c is None:
        return {}
    if not isinstance(c, dict) or not set(c) <= set(CANDIDATE_QUOTAS):
        raise ManifestError(f"retrieval.candidates must be an object with keys among {', '.join(CANDIDATE_QUOTAS)}, not {clip(c)}")
    return {k: _int(v, f"retrieval.candidates.{k}") for k, v in c.items()}


def _int(v: Any, field: str, *, none_ok: bool = False, minimum: int = 0) -> int | None:
    if v is None and none_ok:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ManifestError(f"{field} must be an integer >= {minimum}, not {clip(v)}")
    return v


def _retrieval(r: Any) -> RetrievalMeta | None:
    if r is None:
        return None
    if not isinstance(r, dict):
        raise ManifestError(f"retrieval must be an object, not {clip(r)}")
    cols = r.get("user_columns")
    if not isinstance(cols, list) or not all(isinstance(c, str) for c in cols):
        raise ManifestError(f"retrieval.user_columns must be a list of strings, not {clip(cols)}")
    ii = r.get("item_item")
    meta = None
    if ii is not None:
        if not isinstance(ii, dict) or not isinstance(ii.get("l2"), (int, float)) or isinstance(ii.get("l2"), bool):
            raise ManifestError(f"retrieval.item_item must be an object with a numeric l2, not {clip(ii)}")
        meta = ItemItemMeta(float(ii["l2"]), _int(ii.get("history_len"), "retrieval.item_item.history_len", minimum=1),
                            _int(ii.get("neighbours", DEFAULT_NEIGHBOURS), "retrieval.item_item.neighbours", minimum=1))
    return RetrievalMeta(tuple(cols), _int(r.get("creator_buckets"), "retrieval.creator_buckets", minimum=1),
                         _int(r.get("history_len", 0), "retrieval.history_len"), meta)
