"""The item side of ranking, in memory: the catalogue and every item's feature state.

Ranking 200+ candidates must not touch the network, so the item feature set's packed
states for the whole catalogue are read from the online store in bulk and kept as one
structured array. Values are exact as of the request, not as of the refresh: the whole
catalogue's frame is computed once per as-of time (requests share it) from served-values
records (features/served_values.py) the table encodes from its own states and keeps across
as-of times, so a new as-of time costs one values read plus `read_features` of the states
of the few items whose exact interval has passed (the same numbers as `read_features` of
every state, bit for bit). Computing the frame from all the states was ~4 ms of the one
request per as-of tick that paid for it (at 200 req/s, 1 request in 20). The table is
refreshed when the store says something changed (the materialisation watermark or the
streaming ingestor's progress moved) and whenever this server ingested events itself.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from features.assemble import Block, prefixed
from features.catalog import ItemCatalog
from features.datasets import ITEMS_FILE, read_items
from features.definitions import FeatureSet
from features.lookup import record_keys
from features.materialize import watermark_key
from features.modes import ModePlan, load_modes, mode_key
from features.on_read import OnReadLayout, is_on_read_record
from features.online.base import OnlineStore
from features.served_values import served_values
from features.state import FeatureFrame, StateLayout, read_features

__all__ = ["ItemTable", "load_catalog", "catalog_stamp", "load_item_table", "change_token", "INGEST_NAME"]

INGEST_NAME = "serve"  # the StreamingIngestor name (its progress lives in the store under stream:serve)
_CHUNK = 5000
_WHOLE_TABLE_MAX = 200_000  # beyond this many items, read only the candidates' rows per request


def catalog_stamp(data_dir: Path) -> tuple[int, int]:
    st = os.stat(Path(data_dir) / ITEMS_FILE)
    return (st.st_mtime_ns, st.st_size)


def load_catalog(data_dir: Path) -> ItemCatalog:
    return ItemCatalog.from_table(read_items(data_dir))


@dataclass(frozen=True)
class ItemTable:
    catalog: ItemCatalog
    layout: StateLayout
    states: np.ndarray  # (n + 1,) states of the item set; row n is the empty state (unknown items)
    found: np.ndarray  # (n,) a record existed in the store
    token: str  # the store's change token when read
    frame_cache: bool = True  # False (baseline): compute only the requested rows, every time
    _frames: dict = field(default_factory=dict, compare=False, repr=False)  # as-of time -> whole-catalogue (frame, block) (one entry)
    modes: ModePlan = field(default_factory=lambda: ModePlan({}))  # every set's serving mode, read with this table (same token)
    _values: dict = field(default_factory=dict, compare=False, repr=False)  # "records": served-values records of `states`

    @property
    def unknown_row(self) -> int:
        return len(self.catalog)

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Catalogue row of each id; unknown ids map to the empty state's row."""
        if len(self.catalog) == 0:
            return np.zeros(len(item_ids), dtype=np.int64)
        r = self.catalog.index(item_ids)
        return np.where(r >= 0, r, self.unknown_row)

    def features(self, rows: np.ndarray, now_ms: int) -> FeatureFrame:
        """Item features of `rows` as of now_ms. The whole catalogue is read once per as-of time
        (requests share it: the server quantises its as-of time) and requests index into it."""
        whole = self._whole(now_ms)
        if whole is None:
            return read_features(self.layout, self.states[rows], now_ms)
        frame = whole[0]
        return FeatureFrame(frame.columns, frame.values[rows], frame.missing[rows], frame.feature_ts[rows])

    def block(self, rows: np.ndarray, now_ms: int) -> Block:
        """The ranker's item inputs of `rows` as of now_ms ("set.column", float32, NaN where
        missing): `Block.of` the `features` of the rows, indexed out of the catalogue's block."""
        whole = self._whole(now_ms)
        if whole is None:
            fr = self.features(rows, now_ms)
            return Block.of(prefixed(self.layout.feature_set.name, tuple(fr.columns)), fr.values, fr.missing)
        return Block(whole[1].names, whole[1].values[rows])

    def _whole(self, now_ms: int) -> tuple[FeatureFrame, Block] | None:
        """The whole catalogue's (frame, block) as of now_ms; None without the frame cache."""
        got = self._frames.get(now_ms)
        if got is None:
            if len(self.states) > _WHOLE_TABLE_MAX or not self.frame_cache:
                return None
            frame = self._catalogue_frame(now_ms)
            got = (frame, Block.of(prefixed(self.layout.feature_set.name, tuple(frame.columns)), frame.values, frame.missing))
            self._frames.clear()  # concurrent writers at worst recompute; values are identical
            self._frames[now_ms] = got
        return got

    def _catalogue_frame(self, now_ms: int) -> FeatureFrame:
        """`read_features(layout, states, now_ms)`, from the kept served-values records where they
        answer and from the states elsewhere; records that did not answer are rewritten as of
        now_ms (the arrays are replaced, never changed in place, so a concurrent reader is safe).
        The records are one structured array (`ServedValues.dtype`), not bytes: the table never
        ships them, and a tick then costs a few vector operations over the catalogue."""
        sv = served_values(self.layout)
        kept = self._values.get("records")
        if kept is None:
            kept = _unwritten(sv, self.states, np.ones(len(self.states), dtype=bool), None)
        rec, kind = kept
        # every row from its record (whole-array operations, no gathers), then the rows whose
        # record cannot answer: empty states read as all missing, the others from their state
        values, missing = sv.values_at(rec, now_ms)
        fts = rec["feature_ts"].astype(np.int64)
        written = kind == _RECORD
        good = written & sv.answers(rec, now_ms)
        empty = np.flatnonzero(kind == _EMPTY)
        if len(empty):
            values[empty], missing[empty], fts[empty] = sv.defaults, True, -1
        rows = np.flatnonzero((kind == _UNWRITTEN) | (written & ~good))
        if len(rows):
            states = self.states[rows]
            fr = read_features(self.layout, states, now_ms)
            values[rows], missing[rows], fts[rows] = fr.values, fr.missing, fr.feature_ts
            rec, kind = rec.copy(), kind.copy()
            rec[rows] = sv.encode_array(states, now_ms)
            kind[rows] = _RECORD
        self._values["records"] = (rec, kind)
        return FeatureFrame(list(sv.columns), values, missing, fts)

    def keep_records_of(self, previous: "ItemTable") -> None:
        """Take over `previous`'s served-values records of the items whose states did not change
        (a refresh after a few items' events then encodes only those items)."""
        kept = previous._values.get("records")
        if kept is None or previous.catalog is not self.catalog or previous.states.dtype != self.states.dtype:
            return
        n = len(self.states)
        a = np.ascontiguousarray(self.states).view(np.uint8).reshape(n, -1)
        b = np.ascontiguousarray(previous.states).view(np.uint8).reshape(n, -1)
        self._values["records"] = _unwritten(served_values(self.layout), self.states, ~(a == b).all(axis=1), kept)

    def content(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(topic, creator_id, duration_s, publish_ts) per row (of `rows()`); the unknown row gets
        the unknown values (-1, -1, 0.0, 0)."""
        topic, creator, duration, publish = self._content
        return topic[rows], creator[rows], duration[rows], publish[rows]

    @functools.cached_property
    def _content(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The catalogue's content columns with the unknown row's values appended (row n)."""
        c = self.catalog
        return (np.append(c.topic.astype(np.int64), -1), np.append(c.creator_id.astype(np.int64), -1),
                np.append(c.duration_s.astype(np.float64), 0.0), np.append(c.publish_ts.astype(np.int64), 0))


_RECORD, _UNWRITTEN, _EMPTY = 0, 1, 2  # a row's kept record: one that may answer; none yet (the state answers, then it is written); an empty state (every feature missing)


def _unwritten(sv, states: np.ndarray, changed: np.ndarray, kept: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """(records, kind) with the rows of `changed` marked unwritten, or empty for a state without
    events, which reads as an empty state does (every feature missing), bit for bit."""
    rec = np.zeros(len(states), dtype=sv.dtype) if kept is None else kept[0].copy()
    kind = np.full(len(states), _UNWRITTEN, dtype=np.int8) if kept is None else kept[1].copy()
    kind[changed] = np.where(states["feature_ts"][changed] >= 0, _UNWRITTEN, _EMPTY)
    return rec, kind


def change_token(store: OnlineStore, item_set: FeatureSet, sets: Sequence[FeatureSet] = ()) -> str:
    """Changes whenever a materialisation or a streaming commit may have changed item states,
    or any set's serving mode changed (the key plan reads each set the way it is served)."""
    return json.dumps([store.get_meta(watermark_key(item_set)), store.get_meta(f"stream:{INGEST_NAME}"),
                       *[store.get_meta(mode_key(fs)) for fs in sets]])


def load_item_table(store: OnlineStore | None, item_set: FeatureSet, catalog: ItemCatalog, *, frame_cache: bool = True,
                    sets: Sequence[FeatureSet] = (), previous: ItemTable | None = None) -> ItemTable:
    """Read every catalogue item's state in bulk (store None: an empty table, all missing), and
    the serving modes of `sets` (an on_read item set's records fold into states here).
    `previous`: the table this one replaces (its records of unchanged items are kept)."""
    lay = StateLayout(item_set)
    if store is None:
        return ItemTable(catalog, lay, lay.empty(len(catalog) + 1), np.zeros(len(catalog), dtype=bool), "none", frame_cache)
    token = change_token(store, item_set, sets)
    modes = load_modes(store, list(sets)) if sets else ModePlan({})
    parts, found = [], []
    for a in range(0, len(catalog), _CHUNK):
        ids = catalog.item_id[a : a + _CHUNK]
        raw = store.get_many(record_keys(item_set, ids))
        st, f = OnReadLayout.cached(item_set).states(raw) if any(is_on_read_record(r) for r in raw) else lay.decode(raw)
        parts.append(st)
        found.append(f)
    parts.append(lay.empty(1))
    table = ItemTable(catalog, lay, np.concatenate(parts), np.concatenate(found) if found else np.zeros(0, dtype=bool), token, frame_cache,
                      modes=modes)
    if previous is not None and frame_cache:
        table.keep_records_of(previous)
    return table
