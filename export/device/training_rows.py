"""The device ranker's training rows: device inputs, labels and the release teacher's scores.

Two kinds of release, two kinds of rows (the ones the release's rankers learned on):

- labelled rows (simulated: impressions labelled by play/like). `build_training_data` is
  rebuilt with the release's seed, row cap and history length, and its fingerprint must equal
  the manifest's (`TrainingDataMismatch` otherwise: other events or code would give the
  teacher rows it never saw). The teacher scores `split.X`; the device row gets the release
  user tower's embedding of the row's user columns and history (int8 round trip) and the
  item's release embedding, or its content embedding from the item tower when the item is
  outside the release vocabulary (int8 round trip). Train rows train, valid rows stop early.
- candidate lists (MovieLens, manifest config.ranker_rows == "candidates"): the release's
  retrieval lists at each user's valid start (`export.device.lists`), label = engaged in
  [valid start, test start), the teacher scoring its own inputs (retrieval columns
  included). Users are split 85/15 (seeded) into train and early-stopping lists. No test
  label is read: every list is cut before the test start and labelled before it.
numpy + ONNX Runtime only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.device.inputs import DeviceFeatureSource, device_columns
from export.device.lists import device_item_item, list_item_item, release_lists, teacher_matrix
from export.device.quant import int8_round_trip
from export.release import Release, ReleaseError, load_release
from export.runtime import ReleaseRuntime
from features.catalog import ItemCatalog
from features.item_item import SparseItemItem
from features.datasets import load_info, read_items
from features.eventlog import EventLog
from features.pit import PitJoiner
from features.repo import feature_sets
from models.data import SPLIT_FRACTIONS, build_training_data, label_rows, split_cuts
from features.sorted_lookup import sorted_positions

__all__ = ["DeviceSplit", "DeviceTrainingData", "TrainingDataMismatch", "device_training_data", "ItemEmbeddingTable",
           "check_feature_sets", "VALID_SHARE"]

VALID_SHARE = 0.15  # candidate-list releases: users whose lists stop early instead of training


class TrainingDataMismatch(ReleaseError):
    """The rebuilt training data is not the data the release was trained on."""


@dataclass(frozen=True)
class DeviceSplit:
    name: str
    user_id: np.ndarray
    item_id: np.ndarray
    ts: np.ndarray
    label: np.ndarray  # float32 0/1
    X: np.ndarray  # (n, F) device inputs, float32, NaN missing
    teacher: np.ndarray  # (n,) the release teacher's probability of the same row

    def __len__(self) -> int:
        return len(self.label)


@dataclass(frozen=True)
class DeviceTrainingData:
    kind: str
    release_id: str
    rows: str  # "labelled" | "candidates"
    columns: tuple[str, ...]
    dim: int
    train: DeviceSplit
    valid: DeviceSplit
    fingerprint: str | None  # the checked training-data fingerprint (labelled rows)
    item_item: SparseItemItem | None = None  # the sparse item-item model behind `item.item_item`, when a column


def check_feature_sets(rel: Release, kind: str, n_topics: int) -> None:
    sets = {fs.name: fs for fs in feature_sets(kind, n_topics)}
    for name, v in rel.feature_set_versions.items():
        if name not in sets or sets[name].version != v:
            have = sets[name].version if name in sets else "absent"
            raise ReleaseError(f"release {rel.release_id} was trained on {name} {v}; this data dir defines {have}")


class ItemEmbeddingTable:
    """Every catalogue item's embedding as a device reads it: the release's (vocabulary items) or
    the item tower's content embedding (others), int8 round-tripped."""

    def __init__(self, rt: ReleaseRuntime, items: ItemCatalog) -> None:
        self.items = items
        d = rt.item_embeddings.shape[1]
        order = np.argsort(rt.vocab)
        sv = rt.vocab[order]
        p = sorted_positions(sv, items.item_id)
        inv = (sv[p] == items.item_id) if len(sv) else np.zeros(len(items), bool)
        E = np.full((len(items), d), np.nan, dtype=np.float32)
        E[inv] = rt.item_embeddings[order[p[inv]]]
        if (~inv).any():
            E[~inv] = rt.content_embeddings(items, items.item_id[~inv])
        self.table = int8_round_trip(E)
        self.dim = d

    def __call__(self, item_ids: np.ndarray) -> np.ndarray:
        row = self.items.index(item_ids)
        out = self.table[np.maximum(row, 0)].copy()
        out[row < 0] = np.nan
        return out


def _load(release_dir, data_dir):
    rel = load_release(release_dir)
    info = load_info(data_dir)
    kind = rel.manifest["dataset"]["kind"]
    if info.kind != kind:
        raise ReleaseError(f"release {rel.release_id} is a {kind} release; {data_dir} holds {info.kind} data")
    check_feature_sets(rel, info.kind, info.n_topics)
    rt = ReleaseRuntime.load(rel, rankers=("teacher_fp32",))
    return rel, info, rt


def device_training_data(release_dir: str | Path, data_dir: str | Path, *, seed: int = 0, rows: str = "candidates") -> DeviceTrainingData:
    """Rows for distilling the device ranker from the release at `release_dir` (see the module docstring).
    `rows`: "candidates" (default, every kind: the lists a device ranks) or "labelled" (the
    release's own labelled rows; simulated releases only)."""
    if rows not in ("candidates", "labelled"):
        raise ValueError(f"rows must be 'candidates' or 'labelled', got {rows!r}")
    rel, info, rt = _load(release_dir, data_dir)
    m = rel.manifest
    kind = info.kind
    items = ItemCatalog.from_table(read_items(data_dir))
    emb_table = ItemEmbeddingTable(rt, items)
    if rows == "candidates":
        return _candidate_rows(rel, rt, info, items, emb_table, seed, data_dir)
    cols = device_columns(kind, emb_table.dim)
    td = build_training_data(data_dir, seed=int(m["seed"]), max_rows=m["config"].get("max_rows"),
                             history_len=int(m["retrieval"].get("history_len", 0)))
    fp, want = td.fingerprint(), m["training_data"]["fingerprint"]
    if fp != want:
        raise TrainingDataMismatch(
            f"the training data rebuilt from {data_dir} has fingerprint {fp}, but release {rel.release_id} was trained on "
            f"{want}: the device ranker must learn on the rows its teacher saw; use the data dir (and code) the release was built from")
    src = DeviceFeatureSource(kind, info.n_topics, td.events, items)
    splits = []
    for s in (td.train, td.valid):
        u = int8_round_trip(rt.user_embeddings(rt.user_inputs(s.X), s.H))
        X = src.matrix(u, emb_table(s.item_id), s.user_id, s.item_id, s.ts, np.arange(len(s.item_id)))
        splits.append(DeviceSplit(s.name, s.user_id, s.item_id, s.ts, s.label, X, rt.score(s.X, "teacher_fp32")))
    return DeviceTrainingData(kind, rel.release_id, "labelled", cols, emb_table.dim, *splits, fp)


def _candidate_rows(rel, rt, info, items, emb_table, seed, data_dir) -> DeviceTrainingData:
    m = rel.manifest
    kind = info.kind
    td_meta = m["training_data"]
    events = EventLog(Path(data_dir) / "events").read(must_exist=True).deduplicated()
    rows = label_rows(kind, events, items, seed=int(m["seed"]))
    c1, c2 = split_cuts(rows.user_id, rows.ts, td_meta.get("split_mode", "time"),
                        tuple(td_meta.get("split_fractions", SPLIT_FRACTIONS)))
    w = (rows.label > 0) & (rows.ts >= c1) & (rows.ts < c2)  # engaged in [valid start, test start)
    truth: dict[int, set[int]] = {}
    for u, i in zip(rows.user_id[w].tolist(), rows.item_id[w].tolist()):
        truth.setdefault(u, set()).add(i)
    cut_of = dict(zip(rows.user_id.tolist(), c1.tolist()))
    users = np.asarray(sorted(truth), dtype=np.int64)
    sets = {fs.name: fs for fs in feature_sets(kind, info.n_topics)}
    used = [sets[n] for n in rt.inputs.sets]
    joiner = PitJoiner(used, events)
    lists = release_lists(rt, joiner, sets[rt.inputs.user_set], events, kind, items, users,
                          np.asarray([cut_of[u] for u in users.tolist()], dtype=np.int64))
    Xt = teacher_matrix(rt, joiner, used, events, kind, items, lists)
    cu, ci, ct = lists.rows()
    y = np.fromiter((1.0 if i in truth[u] else 0.0 for u, i in zip(cu.tolist(), ci.tolist())), dtype=np.float32, count=len(ci))
    u_emb = int8_round_trip(lists.user_emb)
    n = np.asarray([len(x) for x in lists.ids])
    src = DeviceFeatureSource(kind, info.n_topics, events, items)
    sparse = device_item_item(rt)
    ii = list_item_item(sparse, events, kind, lists) if sparse is not None else None
    cols = device_columns(kind, emb_table.dim, item_item=sparse is not None)
    X = src.matrix(np.repeat(u_emb, n, axis=0), emb_table(ci), cu, ci, ct, np.repeat(np.arange(len(n)), n), ii)
    p = rt.score(Xt, "teacher_fp32")
    valid_users = np.random.default_rng(seed).random(len(users)) < VALID_SHARE
    is_valid = np.repeat(valid_users, n)
    pick = lambda mk, name: DeviceSplit(name, cu[mk], ci[mk], ct[mk], y[mk], X[mk], p[mk])  # noqa: E731
    return DeviceTrainingData(kind, rel.release_id, "candidates", cols, emb_table.dim, pick(~is_valid, "train"),
                              pick(is_valid, "valid"), None, sparse)
