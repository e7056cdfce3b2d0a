"""Replay the held-out requests through the server's own path under stale, missing and slow reads.

The requests are `parity eval`'s: the same users (pipeline.heldout.held_out, the same seeded
sample for `max_users`), each at its test start t, scored against the same truth with the
same list metric. Each request runs the server's code, not a copy of it:

    records (backtest.asof: the bytes the store would hold, each set as of t - staleness)
      → dropped records (None) and reads that missed their budget (server.records: the read
        falls back to defaults, `fallback_read`; the wait is `store_wait_s`)
      → UserFeaturePlan.decode at t (the server's missing policy, windows read at t)
      → server.pipeline.retrieve / recommend on a Snapshot built as server/state.py builds
        it, its ItemTable holding the item states as of t - staleness (read at t)
      → top k → NDCG@k, recall@k; every candidate's score → AUC.

With everything fresh and complete the answers are `parity eval`'s two-stage student_int8
numbers to the last digit (tests/backtest check it), provided `per_creator_cap` is 0 as eval
has it; the server's default cap of 3 is a post-processing choice eval does not make.

AUC: pooled over every request's ranked candidates, a candidate being positive when it is
in the user's held-out truth: eval's definition for releases whose rankers learn on candidate
lists (MovieLens). For releases trained on labelled impressions, eval's AUC is over those
rows instead; the backtest keeps the candidate-list definition, the one the serving path
can reproduce, so its AUC is comparable across conditions, not with eval's there.

What is not modelled, on purpose: the server's caches (a response or feature cache hit would
hide staleness the cache itself adds) and the stale-records fallback (a user whose read fails
gets defaults, as on a server that has not served them since it started: the pessimistic
case); the store breaker across requests (a replay has no wall clock) — within a request, a
failed first read opens it, so the deferred pair read (a second round trip, only when a pair
set has too many values to prefetch) is refused, as on the server. Latency applies to a
networked store: the memory store answers inline and never times out.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from backtest.asof import SEEN_SET, AsOfStore
from backtest.conditions import USER_RECORD, Condition
from backtest.latency import LatencyModel
from features.datasets import EVENTS_DIR, load_info
from features.eventlog import EventLog
from features.repo import feature_sets
from models.metrics import auc
from pipeline.heldout import held_out, topk_metrics
from server import pipeline
from server.config import ServerConfig
from server.items import ItemTable, catalog_stamp, load_catalog, load_item_table
from server.pipeline import Timer
from server.records import STORE_TIMEOUT, RecordRead, fallback_read, store_wait_s
from server.state import Snapshot, build_snapshot, load_runtime

__all__ = ["NO_ANSWER", "BacktestResult", "ConditionResult", "Replay", "RequestOutcome"]


NO_ANSWER = "store_unavailable"  # the reason of a user read dropped as a whole (the store did not answer)
_BREAKER = "store_breaker_open"  # a second read after a failed first one (server.records.UserRecords.store_read)


@dataclass(frozen=True)
class RequestOutcome:
    """One request under one condition: what the server would have answered."""

    ids: np.ndarray  # every ranked candidate
    scores: np.ndarray  # float32, the ranker's
    top: np.ndarray  # indices of the top k into ids
    degraded: bool  # the server would have flagged the answer degraded
    user_missing: float  # share of the user set's columns missing (UserFeatures.missing_rate)
    reads: int  # store round trips made
    missed: int  # ... of which missed their budget


@dataclass(frozen=True)
class ConditionResult:
    condition: Condition
    ndcg: float
    recall: float
    auc: float
    degraded: float  # share of requests answered degraded
    user_missing: float  # mean share of the user set's columns missing
    read_misses: float  # share of store reads that missed the budget (latency conditions)


@dataclass(frozen=True)
class BacktestResult:
    release_id: str
    dataset: str
    users: int
    k: int
    targets: tuple[str, ...]  # what was varied one at a time: sets the release reads and the seen record
    results: list[ConditionResult]
    seconds: float
    per_creator_cap: int
    budget_ms: float | None = None
    latency: str | None = None  # the latency model's description
    latency_share_over_budget: float | None = None  # the model's expected share of reads past the wait

    @property
    def fresh(self) -> ConditionResult:
        return next(r for r in self.results if r.condition.kind == "fresh")


@dataclass
class _Acc:
    metrics: list[tuple[float, float]] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    degraded: int = 0
    user_missing: float = 0.0
    reads: int = 0
    missed: int = 0

    def add(self, out: RequestOutcome, truth: set[int], k: int) -> None:
        self.metrics.append(topk_metrics(out.ids[out.top], truth, k))
        self.labels.append(np.fromiter((int(i) in truth for i in out.ids.tolist()), dtype=np.float64, count=len(out.ids)))
        self.scores.append(out.scores)
        self.degraded += out.degraded
        self.user_missing += out.user_missing
        self.reads += out.reads
        self.missed += out.missed

    def result(self, cond: Condition) -> ConditionResult:
        n = len(self.metrics)
        y = np.concatenate(self.labels) if self.labels else np.zeros(0)
        s = np.concatenate(self.scores) if self.scores else np.zeros(0, np.float32)
        return ConditionResult(cond, float(np.mean([a for a, _ in self.metrics])), float(np.mean([b for _, b in self.metrics])),
                               auc(y, s), self.degraded / n, self.user_missing / n, self.missed / self.reads if self.reads else 0.0)


class Replay:
    """A release and its data dir, ready to replay the held-out requests under conditions."""

    def __init__(self, release_dir: str | Path, data_dir: str | Path, *, max_users: int | None = None, seed: int = 0,
                 per_creator_cap: int = 0, budget_ms: float | None = None, latency: LatencyModel | None = None, k: int = 10,
                 server: Mapping[str, object] | None = None) -> None:
        """`server`: other ServerConfig fields to replay with (e.g. pair_prefetch_limit)."""
        data_dir = Path(data_dir)
        info = load_info(data_dir)
        self.kind = info.kind
        self.sets = {fs.name: fs for fs in feature_sets(info.kind, info.n_topics)}
        store_s = {} if budget_ms is None else {"store_budget_s": budget_ms / 1000.0, "store_timeout_s": budget_ms / 1000.0}
        # --budget-ms is the store budget and the store client's socket timeout together, as an
        # operator choosing a budget would set them (the shipped 0.15 s budget sits above a 0.1 s
        # socket timeout, so a Redis read is really cut at 0.1 s)
        self.cfg = ServerConfig(release=Path(release_dir), data_dir=data_dir, metrics_port=None,
                                **{**dict(server or {}), "per_creator_cap": per_creator_cap, **store_s})
        self.k, self.seed, self.latency, self.budget_ms = k, seed, latency, budget_ms
        self.runtime = load_runtime(self.cfg.release, self.sets, ort_threads=self.cfg.ort_threads, ranker=self.cfg.ranker, seen_cap=self.cfg.seen_cap)
        events = EventLog(data_dir / EVENTS_DIR).read(must_exist=True).deduplicated()
        self.catalog = load_catalog(data_dir)
        self.heldout = held_out(self.runtime.release, info.kind, events, self.catalog, max_users=max_users, seed=seed)
        used = [self.sets[n] for n in self.runtime.inputs.sets]
        self.store = AsOfStore(used, events, info.kind, self.cfg.seen_cap)
        self.item_set = self.sets[self.runtime.inputs.item_set]
        empty = load_item_table(None, self.item_set, self.catalog, frame_cache=self.cfg.item_frame_cache)
        self.base = build_snapshot(self.runtime, empty, self.sets, catalog_stamp(data_dir), prefetch_limit=self.cfg.pair_prefetch_limit)
        self.targets: tuple[str, ...] = (*self.runtime.inputs.sets, SEEN_SET)
        self.budget_s = min(self.cfg.default_deadline_s, self.cfg.max_deadline_s)  # a request that carries no deadline

    # -- the request ----------------------------------------------------------------------------
    def item_table(self, as_of: int, drop: np.ndarray | None = None) -> ItemTable:
        """The server's item table had the store last been written at `as_of` (server.items.
        load_item_table's steps: every catalogue item's record, decoded; absent → empty state)."""
        lay = self.base.items.layout
        raw = self.store.set_records(self.item_set.name, self.catalog.item_id, as_of)
        if drop is not None:
            raw = [None if d else r for r, d in zip(raw, drop.tolist())]
        states, found = lay.decode(raw)
        return ItemTable(self.catalog, lay, np.concatenate([states, lay.empty(1)]), found, f"asof:{as_of}", self.cfg.item_frame_cache)

    def snapshot(self, items: ItemTable) -> Snapshot:
        """The release's snapshot with another item table (what ReleaseManager.refresh_items swaps in)."""
        return replace(self.base, items=items)

    def _missed(self, rng: np.random.Generator, left_s: float) -> tuple[bool, float]:
        """(missed, seconds the request spent waiting) of one store read under the latency model."""
        wait = store_wait_s(self.cfg.store_budget_s, left_s)
        took = self.latency.sample(rng) / 1000.0
        return took > wait, min(took, wait)

    def read_user(self, snap: Snapshot, user: int, t: int, cond: Condition, rng: np.random.Generator,
                  records: Callable[[list, dict[str, int]], list] | None = None) -> tuple[RecordRead, float, int]:
        """The request's one round trip for the user's records (user set, prefetched pair sets,
        seen record) under `cond`: (what server.records hands to decode, seconds spent waiting,
        1 if the read missed its budget else 0). `records(keys, as_of)` answers for the store
        (default: this replay's as-of store)."""
        records = records or self.store.get_many
        keys = snap.plan.keys(user)
        as_of = {name: t - cond.staleness_for(name) for name in self.targets}
        fault, spent, missed = None, 0.0, 0
        p = cond.missing_for(USER_RECORD)
        if p > 0 and rng.random() < p:
            fault = NO_ANSWER
        if cond.latency:
            miss, spent = self._missed(rng, self.budget_s)
            missed = int(miss)
            fault = fault or (STORE_TIMEOUT if miss else None)
        if fault is not None:
            return fallback_read(None, fault), spent, missed  # no last-good records kept: see the module docstring
        raw = _drop(records(keys, as_of), [k.feature_set for k in keys], cond, rng)
        return RecordRead(raw, "store", None), spent, missed

    def request(self, snap: Snapshot, user: int, t: int, cond: Condition, rng: np.random.Generator,
                records: Callable[[list, dict[str, int]], list] | None = None, memo: dict | None = None) -> RequestOutcome:
        """One request at t under `cond`, through the server's read policy, decode and pipeline.
        `memo`: outcomes of this user's earlier requests, reused when the records are the same."""
        records = records or self.store.get_many
        plan = snap.plan
        rr, spent, missed = self.read_user(snap, user, t, cond, rng, records)
        reads = 1
        fault = rr.reason
        as_of = {name: t - cond.staleness_for(name) for name in self.targets}
        key = None
        if memo is not None and not plan.deferred:  # the pipeline is pure: same records, same answer
            key = (id(snap.items), None if rr.raw is None else tuple(rr.raw), rr.reason)
            hit = memo.get(key)
            if hit is not None:
                return replace(hit, reads=reads, missed=missed)
        uf = plan.decode(user, rr.raw, t, source=rr.source, degraded=rr.reason is not None)
        exclude = np.empty(0, dtype=np.int64)
        degraded = rr.reason is not None or uf.degraded
        if plan.deferred:  # a pair set with too many values to prefetch: the server's second round trip
            cand = pipeline.retrieve(snap, uf, exclude, t, self.cfg, Timer())
            need = pipeline.missing_pair_values(snap, uf, cand.rows)
            extra = {}
            if need:
                reads += 1
                fault2 = _BREAKER if fault is not None else None
                if fault2 is None and cond.latency:
                    miss, _ = self._missed(rng, self.budget_s - spent)
                    missed += miss
                    fault2 = STORE_TIMEOUT if miss else None
                by_name = {fs.name: fs for fs, _ in plan.pair_sets}
                for name, vals in need.items():
                    ks = plan.pair_keys(by_name[name], user, vals)
                    raw2 = None if fault2 else _drop(records(ks, as_of), [name] * len(ks), cond, rng)
                    extra[name] = plan.decode_pairs(by_name[name], vals, raw2, t)
                degraded = degraded or fault2 is not None
            ranked, top = pipeline.recommend(snap, uf, exclude, self.k, t, self.cfg, Timer(), cand, extra)
        else:
            ranked, top = pipeline.recommend(snap, uf, exclude, self.k, t, self.cfg, Timer())
        out = RequestOutcome(ranked.ids, ranked.scores, top, degraded, uf.missing_rate, reads, missed)
        if key is not None:
            memo[key] = out
        return out

    # -- the run --------------------------------------------------------------------------------
    def run(self, conditions: Sequence[Condition], *, progress: Callable[[int, int], None] | None = None) -> BacktestResult:
        """Every held-out request under every condition. Each condition draws from its own
        generator (seeded by the seed and its position), so adding a condition never changes
        another's draws; requests run user by user, conditions inside, so the records and item
        tables a user's conditions share are built once."""
        if any(c.latency for c in conditions) and self.latency is None:
            raise ValueError("a latency condition needs a latency model (Replay(latency=...))")
        t0 = time.perf_counter()
        item = self.item_set.name
        rngs = [np.random.default_rng([self.seed, i]) for i in range(len(conditions))]
        accs = [_Acc() for _ in conditions]
        snaps: dict[tuple, Snapshot] = {}
        cur_t = None
        ho = self.heldout
        for n, (user, t) in enumerate(zip(ho.users.tolist(), ho.cut.tolist())):
            if t != cur_t:  # item tables are per request time (one for a global time split)
                snaps.clear()
                cur_t = t
            records = _UserReads(self.store)  # this user's reads, each (set, as-of) computed once
            memo: dict = {}
            for ci, cond in enumerate(conditions):
                p_item = cond.missing_for(item)
                sk = (t - cond.staleness_for(item), ci if p_item > 0 else None)
                if sk not in snaps:
                    drop = rngs[ci].random(len(self.catalog)) < p_item if p_item > 0 else None
                    snaps[sk] = self.snapshot(self.item_table(sk[0], drop))
                accs[ci].add(self.request(snaps[sk], user, t, cond, rngs[ci], records, memo), ho.truth[user], self.k)
            if progress is not None:
                progress(n + 1, len(ho.users))
        results = [a.result(c) for a, c in zip(accs, conditions)]
        share = None
        if self.latency is not None:
            share = self.latency.share_over(1000.0 * store_wait_s(self.cfg.store_budget_s, self.budget_s))
        varied = tuple(x for x in self.targets if any(c.target == x for c in conditions))
        return BacktestResult(self.runtime.release_id, self.kind, len(ho.users), self.k, varied, results, time.perf_counter() - t0,
                              self.cfg.per_creator_cap, self.budget_ms, self.latency.description if self.latency else None, share)


class _UserReads:
    """One user's store answers, each (set, as-of, keys) computed once across conditions."""

    def __init__(self, store: AsOfStore) -> None:
        self.store = store
        self.got: dict[tuple[str, int, tuple], list] = {}

    def __call__(self, keys: list, as_of: dict[str, int]) -> list:
        out: list = [None] * len(keys)
        by_set: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            by_set.setdefault(k.feature_set, []).append(i)
        for name, idx in by_set.items():
            ck = (name, as_of[name], tuple(keys[i].entity_id for i in idx))
            if ck not in self.got:
                self.got[ck] = self.store.get_many([keys[i] for i in idx], as_of)
            for i, r in zip(idx, self.got[ck]):
                out[i] = r
        return out


def _drop(raw: list, sets: list[str], cond: Condition, rng: np.random.Generator) -> list:
    """Each record independently replaced by None (absent) with its set's missing probability."""
    p = np.asarray([cond.missing_for(s) for s in sets], dtype=np.float64)
    if not (p > 0).any():
        return raw
    gone = rng.random(len(raw)) < p
    return [None if g else r for r, g in zip(raw, gone.tolist())]
