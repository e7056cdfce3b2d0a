"""Parity's own models under MovieLens's published protocol (see models.protocol).

The training 80% becomes a data dir of its own (only those rating events), and `parity
train` (pipeline.train.train_release) builds a whole release from it with the same code,
profile and seed as the release being evaluated: two-tower, candidate-list rankers (teacher,
student, int8 student). Every user then ranks ALL unseen items, through the release's ONNX
files (export.runtime, as `parity eval` and the server do), with features and history as of
the end of the training 80%:

- ``parity_two_tower``: the user tower . item embeddings over the full catalogue;
- ``parity_two_stage``: the server's candidate union (the two-tower's top unseen items, the
  item-item model's best for the history, fresh and popular items, with the quotas the release
  chose on validation: `export.candidates.candidate_union`) re-ranked by the int8
  student, with the list-relative retrieval columns computed per list as the server does
  (`features.assemble.retrieval_columns`, incl. the item-item score for the user's history);
  the rest of the catalogue below them, in tower order;
- ``parity_two_stage_teacher``: the same lists re-ranked by the fp32 teacher;
- ``parity_item_item``: the release's item-item model alone (`features.item_item`) over the
  full catalogue, for the history as of the end of the training 80%.

With `diagnostics=True` (studies on the validation holdout), also: the lists' recall of the
held-out items (``parity_lists_recall``) and the same lists in the tower's order
(``parity_lists_tower_order``) and in the item-item model's order
(``parity_lists_item_item_order``): whether retrieval or the re-ranking loses the items.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from export.candidates import CandidatePolicy, NewItems, candidate_union
from export.release import load_release
from export.runtime import ReleaseRuntime
from features.assemble import RETRIEVAL_COLUMNS, RankerInputs, columns_from_join, retrieval_columns
from features.datasets import load_info, read_items, read_users, write_catalogue
from features.eventlog import EventLog
from features.history import history_at
from features.pit import PitJoiner
from features.repo import feature_sets
from features.catalog import ItemCatalog
from models.data import feature_matrix
from models.protocol import full_ranking_metrics, protocol_baselines, protocol_split

__all__ = ["published_protocol"]


def published_protocol(data_dir: str | Path, release_dir: str | Path | None = None, *, seed: int | None = None,
                       profile: str | None = None, candidates: int = 200, holdout: str = "test",
                       overrides: dict | None = None, diagnostics: bool = False,
                       n_item_item: int | None = None, final_order: str | None = None) -> dict[str, dict[str, float]]:
    """Popularity, ALS and Parity under the published protocol. The profile and seed default
    to the release's (`release_dir`), else "default" and 0. `holdout="valid"` measures on a
    validation split instead, for choices that must not look at the test 20%: the training 80%
    split again the same way (12.5% of it held out, seed + 1) and the test 20% never read.
    `diagnostics`: also the candidate lists' recall of the held-out items and NDCG@10 of the same
    lists in the tower's and in the item-item model's order (is it retrieval or the re-ranking).
    `n_item_item`: the item-item source's quota in the candidate lists, out of `candidates` (None:
    the release's own choice, manifest retrieval.candidates), for studies on the validation holdout.
    `final_order`: the release's ranking.order ("ranker" or "item_item"); None chooses it as a
    setting is chosen: on the test holdout, a validation pass first (the training 80% split
    again, as `holdout="valid"`) ranks the same kind of lists both ways and the order with the
    higher NDCG@10 is the release's (`parity_order` says which and why). The release's own
    time-split validation cannot make this choice: it matches the time protocol, not this one.
    On the validation holdout both orders are reported (`parity_two_stage_item_item`)."""
    if final_order not in (None, "ranker", "item_item"):
        raise ValueError(f"final_order must be None, 'ranker' or 'item_item', got {final_order!r}")
    if n_item_item is not None and not 0 <= n_item_item <= candidates:
        raise ValueError(f"n_item_item must be in [0, {candidates}], got {n_item_item}")
    info = load_info(data_dir)
    if info.kind != "movielens":
        raise ValueError(f"the published protocol is defined for MovieLens; {data_dir} holds {info.kind} data")
    if release_dir is not None:
        m = load_release(release_dir).meta
        profile = m.profile if profile is None else profile
        seed = m.seed if seed is None else seed
    profile = "default" if profile is None else profile
    seed = 0 if seed is None else seed
    from pipeline.train import train_release  # torch: imported only when the protocol runs

    events = EventLog(Path(data_dir) / "events").read(must_exist=True).deduplicated()
    if holdout not in ("test", "valid"):
        raise ValueError(f"holdout must be 'test' or 'valid', got {holdout!r}")
    order_note = {"order": final_order, "chosen_on": "given"} if final_order is not None else None
    if holdout == "test" and final_order is None:
        v = published_protocol(data_dir, seed=seed, profile=profile, candidates=candidates, holdout="valid", overrides=overrides,
                               n_item_item=n_item_item)
        both = {"item_item": v.get("parity_two_stage_item_item", {}).get("ndcg@10"), "ranker": v["parity_two_stage"]["ndcg@10"]}
        final_order = "item_item" if both["item_item"] is not None and both["item_item"] > both["ranker"] else "ranker"
        order_note = {"order": final_order, "chosen_on": "validation: the training 80% split again (12.5% held out, seed + 1)",
                      "valid_ndcg@10": both}
    if holdout == "valid" and final_order is None:
        final_order = "ranker"  # the validation pass: both orders reported, the release's own choice not asked
    if final_order is not None:
        overrides = {**(overrides or {}), "final_order": final_order}
    split = protocol_split(events, seed)
    if holdout == "valid":
        split = protocol_split(split.train_events, seed + 1, test_frac=0.125)
    out = protocol_baselines(split, seed)
    with tempfile.TemporaryDirectory(prefix="parity-protocol-") as tmp:
        d = Path(tmp) / "train80"
        sub = dataclasses.replace(info, n_events=len(split.train_events), params={**info.params, "protocol": "random 80/20 of ratings >= 4"})
        EventLog(d / "events").append(split.train_events)
        write_catalogue(d, read_items(data_dir), read_users(data_dir), dataclasses.replace(sub, pii_fields={"users": []}))
        rel = train_release(d, Path(tmp) / "releases", profile=profile, seed=seed, overrides=overrides)
        rt = ReleaseRuntime.load(rel)
        sets = {fs.name: fs for fs in feature_sets(info.kind, info.n_topics)}
        used = [sets[n] for n in rt.inputs.sets]
        train_events = EventLog(d / "events").read(must_exist=True).deduplicated()
        items = ItemCatalog.from_table(read_items(d))
        joiner = PitJoiner(used, train_events)
        t_end = int(split.train_events.ts.max()) + 1
        uids = split.user_ids
        ucols = columns_from_join(joiner.join(pa.table({"user_id": uids, "ts": np.full(len(uids), t_end)}), only=[rt.inputs.user_set]),
                                  [sets[rt.inputs.user_set]])
        U = np.stack([np.where(ucols[c][1], np.nan, ucols[c][0]) for c in rt.user_columns], axis=1).astype(np.float32)
        H = history_at(train_events, info.kind, uids, t_end, rt.history_len) if rt.history_len else None
        ue = rt.user_embeddings(U, H)
        Hii = history_at(train_events, info.kind, uids, t_end, rt.item_item.history_len) if rt.item_item is not None else None
        row = {x: r for r, x in enumerate(rt.vocab.tolist())}
        rows = np.asarray([row.get(x, -1) for x in split.item_ids.tolist()], dtype=np.int64)
        tower = np.where(rows >= 0, (ue @ rt.item_embeddings[np.maximum(rows, 0)].T).astype(np.float64), -np.inf)  # not in the release: last
        out["parity_two_tower"] = full_ranking_metrics(split, lambda ub: tower[ub])
        if Hii is not None:  # the release's item-item model alone (fitted on the release's train split)
            ii = np.stack([np.where(m, -np.inf, v) for v, m in (rt.item_item.scores(h, split.item_ids) for h in Hii)])
            out["parity_item_item"] = full_ranking_metrics(split, lambda ub: ii[ub])
        seen = [set() for _ in range(len(uids))]
        for u, i in zip(split.train_u.tolist(), split.train_i.tolist()):
            seen[u].add(i)
        base = RankerInputs(rt.inputs.user_set, rt.inputs.item_set, rt.inputs.pair_sets, rt.inputs.affinity,
                            tuple(c for c in rt.inputs.columns if c not in RETRIEVAL_COLUMNS))

        policy = dataclasses.replace(CandidatePolicy(), retrieve_k=candidates).for_release(rt.release.meta.candidates)
        if n_item_item is not None:
            policy = dataclasses.replace(policy, retrieve_k=candidates - n_item_item, n_item_item=n_item_item)
        new = NewItems.of(rt, items)
        col = {x: j for j, x in enumerate(split.item_ids.tolist())}

        def lists(s: np.ndarray, u: int) -> np.ndarray:
            """Column indices of one user's candidate list: the server's candidate function
            (export.candidates.candidate_union, the release's quotas) with the tower's exact
            order as its ANN list, as of the end of the training 80%."""
            top = np.argsort(-s, kind="stable")[: policy.retrieve_k + 50]
            top = top[np.isfinite(s[top])]
            blocked = np.fromiter(seen[u], dtype=np.int64, count=len(seen[u]))
            c = candidate_union(rt, ue[u], items, new, blocked, t_end, policy, ann_ids=split.item_ids[top],
                                history=Hii[u] if Hii is not None else None)
            return np.asarray([col[x] for x in c.ids.tolist() if x in col], dtype=np.int64)

        test_users = np.unique(split.test_u)
        lists_of = {}  # user index -> (candidate columns, ranker inputs X): built once, scored by each ranker

        def build(ub: np.ndarray) -> None:
            s = tower[ub].copy()
            for r, u in enumerate(ub.tolist()):
                s[r, list(seen[u])] = -np.inf
            tops = [lists(s[r], u) for r, u in enumerate(ub.tolist())]
            n = np.asarray([len(t) for t in tops])
            ids = split.item_ids[np.concatenate(tops)]
            Xb = feature_matrix(base, joiner, used, items, np.repeat(uids[ub], n), ids, t_end)
            X = np.empty((len(ids), len(rt.inputs.columns)), dtype=np.float32)
            pos = {c: j for j, c in enumerate(base.columns)}
            rc = [retrieval_columns(rt.item_scores(ue[u], split.item_ids[tops[r]]), split.item_ids[tops[r]],
                                    Hii[u] if Hii is not None else None, rt.item_item) for r, u in enumerate(ub.tolist())]
            for j, c in enumerate(rt.inputs.columns):
                X[:, j] = np.concatenate([np.where(x[c][1], np.nan, x[c][0]) for x in rc]) if c in RETRIEVAL_COLUMNS else Xb[:, pos[c]]
            off = np.r_[0, np.cumsum(n)]
            for r, u in enumerate(ub.tolist()):
                lists_of[u] = (tops[r], X[off[r] : off[r + 1]])

        for a in range(0, len(test_users), 256):
            build(test_users[a : a + 256])

        def reranked(list_score, raw: bool = False) -> np.ndarray:
            """Full-catalogue scores: each list ordered by `list_score(u, cols, X)` (`raw`: the score itself, in
            [0, 1], else its rank in the list, ties in list order), the rest below in tower order."""
            full = np.where(np.isfinite(tower), tower - 10.0, -np.inf)  # tower scores are in [-1, 1]: the lists sit above
            for u, (t, X) in lists_of.items():
                v = np.asarray(list_score(u, t, X), dtype=np.float64)
                if raw:
                    full[u, t] = 1.0 + v
                    continue
                r = np.argsort(np.argsort(-np.where(np.isfinite(v), v, -np.inf), kind="stable"), kind="stable")  # rank in the list, NaN last
                full[u, t] = 1.0 + (len(t) - r) / max(len(t), 1)
            return full

        def by_ranker(ranker: str):
            return lambda u, t, X: rt.score(X, ranker)

        def metrics(full: np.ndarray) -> dict[str, float]:
            return full_ranking_metrics(split, lambda ub: full[ub])

        # the release's order (ranking.order) over the int8 student, as the server orders a list
        out["parity_two_stage"] = metrics(reranked(lambda u, t, X: rt.final_scores(X, "student_int8"), raw=True))
        out["parity_two_stage_teacher"] = metrics(reranked(by_ranker("teacher_fp32"), raw=True))
        if holdout == "valid" and rt.inputs.uses_item_item:  # the other order, for the choice above
            other = "item_item" if rt.order == "ranker" else "ranker"
            out[f"parity_two_stage_{other}"] = metrics(
                reranked(lambda u, t, X: rt.final_scores(X, "student_int8", order=other), raw=True))
        if order_note is not None:
            out["parity_order"] = order_note
        if not diagnostics:
            return out
        # the same lists in the tower's order and in the item-item model's order
        out["parity_lists_tower_order"] = metrics(reranked(lambda u, t, X: tower[u, t]))
        if Hii is not None:
            out["parity_lists_item_item_order"] = metrics(reranked(lambda u, t, X: ii[u, t]))
        truth = {}
        for u, i in zip(split.test_u.tolist(), split.test_i.tolist()):
            truth.setdefault(u, set()).add(i)
        out["parity_lists_recall"] = {"recall@list": float(np.mean([len(truth[u].intersection(lists_of[u][0].tolist())) / len(truth[u]) for u in truth])),
                                      "mean_len": float(np.mean([len(v[0]) for v in lists_of.values()]))}
    return out
