"""The item side of ranking, in memory: the catalogue and every item's feature state.

Ranking 200+ candidates must not touch the network, so the item feature set's packed
states for the whole catalogue are read from the online store in bulk and kept as one
structured array. Values are computed from the states at request time with the same
`read_features` the store and training use, so windows and decay are exact as of the
request, not as of the refresh. The table is refreshed when the store says something changed
(the materialisation watermark or the streaming ingestor's progress moved) and whenever this
server ingested events itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from features.catalog import ItemCatalog
from features.datasets import ITEMS_FILE, read_items
from features.definitions import FeatureSet
from features.lookup import record_keys
from features.materialize import watermark_key
from features.modes import ModePlan, load_modes, mode_key
from features.on_read import OnReadLayout, is_on_read_record
from features.online.base import OnlineStore
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
    _frames: dict = field(default_factory=dict, compare=False, repr=False)  # as-of time -> whole-catalogue frame (one entry)
    modes: ModePlan = field(default_factory=lambda: ModePlan({}))  # every set's serving mode, read with this table (same token)

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
        frame = self._frames.get(now_ms)
        if frame is None:
            if len(self.states) > _WHOLE_TABLE_MAX or not self.frame_cache:
                return read_features(self.layout, self.states[rows], now_ms)
            frame = read_features(self.layout, self.states, now_ms)
            self._frames.clear()  # concurrent writers at worst recompute; values are identical
            self._frames[now_ms] = frame
        return FeatureFrame(frame.columns, frame.values[rows], frame.missing[rows], frame.feature_ts[rows])

    def content(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(topic, creator_id, duration_s, publish_ts) per row; unknown rows get the unknown values."""
        c = self.catalog
        known = rows < len(c)
        r = np.where(known, rows, 0)
        if len(c) == 0:
            n = len(rows)
            return np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.zeros(n), np.zeros(n, np.int64)
        return (np.where(known, c.topic[r], -1).astype(np.int64), np.where(known, c.creator_id[r], -1).astype(np.int64),
                np.where(known, c.duration_s[r], 0.0), np.where(known, c.publish_ts[r], 0).astype(np.int64))


def change_token(store: OnlineStore, item_set: FeatureSet, sets: Sequence[FeatureSet] = ()) -> str:
    """Changes whenever a materialisation or a streaming commit may have changed item states,
    or any set's serving mode changed (the key plan reads each set the way it is served)."""
    return json.dumps([store.get_meta(watermark_key(item_set)), store.get_meta(f"stream:{INGEST_NAME}"),
                       *[store.get_meta(mode_key(fs)) for fs in sets]])


def load_item_table(store: OnlineStore | None, item_set: FeatureSet, catalog: ItemCatalog, *, frame_cache: bool = True,
                    sets: Sequence[FeatureSet] = ()) -> ItemTable:
    """Read every catalogue item's state in bulk (store None: an empty table, all missing), and
    the serving modes of `sets` (an on_read item set's records fold into states here)."""
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
    return ItemTable(catalog, lay, np.concatenate(parts), np.concatenate(found) if found else np.zeros(0, dtype=bool), token, frame_cache,
                     modes=modes)
