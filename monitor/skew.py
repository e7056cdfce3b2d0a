"""Live parity: the features the ranker saw, recomputed with the batch path once the events
have landed (log-and-wait), compared value by value.

`parity features verify` proves that the streaming path equals the batch path on a replay;
this is its production form: what the server actually fed the ranker (the served log), against
what the batch point-in-time join (features.pit, the join training reads) computes for the same
(user, item) as of the request's time, through the same `features.assemble.assemble`. A
difference means the request path read something training never would: a stale cache, a
missed ingest, a wrong key, a clock off, an item table not refreshed.

What is compared: every logged row with features (the returned items and the sampled
candidates), grouped by feature set (the column-name prefix: `user_activity.*`, `user_topic.*`,
...). The derived columns are checked too: `request.*` from the request time and the item's
publish time, `item.*` from the catalogue, `cross.*` from the user's affinity vector and the
item's topic, `trend.*` from the row's own windowed item and pair columns (`features.assemble.TREND_COLUMNS`).
The list-relative `retrieval.*` columns (rank and score gap within the request's
candidate list, the item-item score of the user's history) depend on the whole candidate list
and the release's towers, not on the row: they are outside this check, and the report says so.

Tolerance: `features verify`'s rule |a - b| <= ATOL + RTOL * max(|a|, |b|), at float32
precision (the log keeps the float32 the ranker read); missing must match missing (NaN on both
sides), and a value against a missing one always differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from features.assemble import RankerInputs, point_in_time_matrix, ranker_inputs
from features.catalog import ItemCatalog
from features.definitions import FeatureSet
from features.events import EventBatch
from features.pit import PitJoiner
from monitor.served_log import ServedBatch

__all__ = ["RTOL", "ATOL", "EXCLUDED_PREFIXES", "SetSkew", "SkewReport", "check_skew", "feature_group"]

RTOL = 1e-6  # a few float32 ulps: features verify's 1e-9 is for float64 on both sides
ATOL = 1e-6
EXCLUDED_PREFIXES = ("retrieval",)  # list-relative: a function of the candidate list, not of the row
_EXCLUDED_WHY = "list-relative (rank and score gap within the request's candidate list, item-item score): not a function of the row"


def feature_group(column: str) -> str:
    """The feature set (or derived group: request, item, cross) a ranker input belongs to."""
    return column.split(".", 1)[0]


@dataclass(frozen=True)
class SetSkew:
    """One feature set's comparison: values compared, how many differ, the largest gap."""

    feature_set: str
    columns: tuple[str, ...]
    compared: int
    differ: int
    missing_mismatch: int  # of `differ`: missing on one side only
    max_abs_diff: float  # over values present on both sides
    examples: tuple[str, ...]

    @property
    def share(self) -> float:
        return self.differ / self.compared if self.compared else 0.0

    def summary(self) -> dict:
        return {"columns": len(self.columns), "compared": self.compared, "differ": self.differ, "share": self.share,
                "missing_mismatch": self.missing_mismatch, "max_abs_diff": self.max_abs_diff}


@dataclass(frozen=True)
class SkewReport:
    rows: int  # logged rows compared
    requests: int
    releases: tuple[str, ...]
    events: int  # events the batch path read
    skipped_rows: int  # logged rows without features (errors, items without inputs)
    rows_after_log_end: int  # requests later than the last event of the log: live events may not have landed yet
    sets: tuple[SetSkew, ...]
    excluded: tuple[str, ...]  # columns outside the check

    @property
    def compared(self) -> int:
        return sum(s.compared for s in self.sets)

    @property
    def differ(self) -> int:
        return sum(s.differ for s in self.sets)

    def set(self, name: str) -> SetSkew:
        for s in self.sets:
            if s.feature_set == name:
                return s
        raise KeyError(f"no feature set {name!r} in the report; it has {[s.feature_set for s in self.sets]}")

    def summary(self) -> dict:
        return {"rows": self.rows, "requests": self.requests, "releases": list(self.releases), "events": self.events,
                "compared": self.compared, "differ": self.differ, "share": self.differ / self.compared if self.compared else 0.0,
                "skipped_rows": self.skipped_rows, "rows_after_log_end": self.rows_after_log_end,
                "sets": {s.feature_set: s.summary() for s in self.sets}, "excluded": list(self.excluded),
                "excluded_why": _EXCLUDED_WHY if self.excluded else None}


def _spec(columns: Sequence[str], sets: Sequence[FeatureSet], release_id: str) -> RankerInputs:
    """The ranker inputs of logged columns, from the data dir's feature sets (the user, item,
    pair and affinity roles are fixed per dataset kind, `features.assemble.ranker_inputs`)."""
    base = ranker_inputs(sets)
    known = {fs.name: fs for fs in sets}
    derived = {feature_group(c) for c in base.columns} - set(known)
    for c in columns:
        g = feature_group(c)
        if g in known:
            if c not in {f"{g}.{x}" for x in known[g].columns}:
                raise ValueError(f"release {release_id} logged column {c!r}, which feature set {g} {known[g].version} of this data dir "
                                 f"does not have (its columns: {list(known[g].columns)[:8]}...)")
        elif g not in derived:
            raise ValueError(f"release {release_id} logged column {c!r}; this data dir defines no feature set {g!r} "
                             f"(it has {sorted(known)})")
    return RankerInputs(base.user_set, base.item_set, base.pair_sets, base.affinity, tuple(columns))


def _compare(served: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(differ, missing mismatch, |a - b| where both present) elementwise."""
    a, b = served.astype(np.float64), batch.astype(np.float32).astype(np.float64)
    na, nb = np.isnan(a), np.isnan(b)
    both = ~na & ~nb
    diff = np.where(both, np.abs(np.where(both, a, 0.0) - np.where(both, b, 0.0)), 0.0)
    close = diff <= ATOL + RTOL * np.maximum(np.abs(np.where(both, a, 0.0)), np.abs(np.where(both, b, 0.0)))
    miss = na != nb
    return miss | (both & ~close), miss, diff


def check_skew(batches: Sequence[ServedBatch], events: EventBatch, sets: Sequence[FeatureSet], items: ItemCatalog, *,
               max_examples: int = 3) -> SkewReport:
    """Compare every logged row's features with the batch path as of its request time.

    `events`: the event log (deduplicated) that has landed; `sets` and `items`: the data dir's
    feature definitions and catalogue. Rows without features are skipped and counted."""
    joiner = PitJoiner(list(sets), events)
    log_end = int(events.ts.max()) if len(events) else -1
    acc: dict[str, dict] = {}
    excluded: set[str] = set()
    rows = skipped = after = 0
    requests: set[str] = set()
    for b in batches:
        t = b.table
        has = np.asarray(t.column("features").is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        has &= t.column("item_id").to_numpy() >= 0
        skipped += int((~has).sum())
        if not has.any() or not b.columns:
            continue
        keep = [j for j, c in enumerate(b.columns) if feature_group(c) not in EXCLUDED_PREFIXES]
        excluded |= {c for c in b.columns if feature_group(c) in EXCLUDED_PREFIXES}
        cols = tuple(b.columns[j] for j in keep)
        spec = _spec(cols, sets, b.release_id)
        sel = t.filter(pa.array(has))
        served = b.feature_matrix(has)[:, keep]
        users = sel.column("user_id").to_numpy()
        item_ids = sel.column("item_id").to_numpy()
        ts = sel.column("ts_ms").to_numpy()
        rids = sel.column("request_id").to_pylist()
        batch = point_in_time_matrix(spec, joiner, sets, items, users, item_ids, ts)
        differ, miss, diff = _compare(served, batch)
        rows += len(ts)
        after += int((ts > log_end).sum())
        requests.update(rids)
        for g in dict.fromkeys(feature_group(c) for c in cols):
            js = [j for j, c in enumerate(cols) if feature_group(c) == g]
            a = acc.setdefault(g, {"columns": [], "compared": 0, "differ": 0, "miss": 0, "max": 0.0, "examples": []})
            a["columns"] += [cols[j] for j in js if cols[j] not in a["columns"]]
            a["compared"] += len(ts) * len(js)
            a["differ"] += int(differ[:, js].sum())
            a["miss"] += int(miss[:, js].sum())
            a["max"] = max(a["max"], float(diff[:, js].max()) if len(ts) else 0.0)
            for i, jj in np.argwhere(differ[:, js])[: max(0, max_examples - len(a["examples"]))].tolist():
                j = js[jj]
                a["examples"].append(f"{cols[j]} release={b.release_id} request={rids[i]} user={int(users[i])} item={int(item_ids[i])} "
                                     f"ts={int(ts[i])}: served={float(served[i, j])!r} batch={float(batch[i, j])!r}")
    out = tuple(SetSkew(g, tuple(a["columns"]), a["compared"], a["differ"], a["miss"], a["max"], tuple(a["examples"]))
                for g, a in acc.items())
    return SkewReport(rows, len(requests), tuple(sorted({b.release_id for b in batches})), len(events), skipped, after, out,
                      tuple(sorted(excluded)))
