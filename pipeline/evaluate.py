"""`parity eval`: every model of a release on the held-out time slice, the way it serves.

The two-stage path is the server's: user features and engagement history as of the test
start (point-in-time), the user tower, then the server's candidate function with the
release's quotas (ANN, item-item for the history, new, fresh and popular items; popular as of
the cut, not the release's list, which saw the held-out slice; seen and not-yet-published
items removed), ranking with each ranker, top 10. Popularity and the two-tower alone are measured on the
same users in the same run. Pure numpy + ONNX Runtime (through export.runtime).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from export.candidates import CandidatePolicy, NewItems, ann_want, candidate_union
from export.device.lists import ReleaseLists, teacher_matrix
from export.release import ReleaseError, load_release
from export.runtime import RANKERS, ReleaseRuntime
from features.assemble import columns_from_join
from features.catalog import ItemCatalog
from features.datasets import load_info, read_items
from features.eventlog import EventLog
from features.history import history_at
from features.pit import PitJoiner
from features.repo import feature_sets
from models.data import feature_matrix
from models.metrics import auc, logloss
from models.popularity import popularity_at
from pipeline.heldout import Eligibility, held_out, popularity_lists, seen_before_cut, topk_metrics

__all__ = ["evaluate_release", "topk_metrics", "EvalResult"]

_POLICY = CandidatePolicy()  # the server's candidate quotas (ServerConfig takes its defaults from the same class)


@dataclass(frozen=True)
class EvalResult:
    release_id: str
    dataset: str
    users: int
    two_stage: dict[str, dict[str, float]]  # model -> {"ndcg@10", "recall@10"}
    retrieval: dict[str, float]
    ranking: dict[str, dict[str, float]]  # model -> {"auc", "logloss"}
    sizes: dict[str, int]
    seconds: float

    def summary(self) -> dict:
        return {"release_id": self.release_id, "dataset": self.dataset, "users": self.users, "two_stage": self.two_stage,
                "retrieval": self.retrieval, "ranking": self.ranking, "sizes": self.sizes}


def evaluate_release(release_dir: str | Path, data_dir: str | Path, *, retrieve_k: int = 200, k: int = 10,
                     max_users: int | None = None, seed: int = 0, part: str = "test") -> EvalResult:
    """`part="valid"`: the same measurement on the validation slice (its users at its start,
    pipeline.heldout), the slice a release chose its settings on: its lift over popularity
    there against the test's says whether the test period moved away from what training saw."""
    t_start = time.perf_counter()
    rel = load_release(release_dir)
    info = load_info(data_dir)
    sets = {fs.name: fs for fs in feature_sets(info.kind, info.n_topics)}
    for name, v in rel.feature_set_versions.items():
        if name not in sets or sets[name].version != v:
            have = sets[name].version if name in sets else "absent"
            raise ReleaseError(f"release {rel.release_id} was trained on {name} {v}; this data dir defines {have}")
    rt = ReleaseRuntime.load(rel)
    events = EventLog(Path(data_dir) / "events").read(must_exist=True).deduplicated()
    items = ItemCatalog.from_table(read_items(data_dir))
    used = [sets[n] for n in rt.inputs.sets]
    joiner = PitJoiner(used, events)

    # The held-out slice, cut exactly as training cut it (globally or per user): pipeline.heldout.
    ho = held_out(rel, info.kind, events, items, max_users=max_users, seed=seed, part=part)
    rows, trow, truth, t_of, users, t_user = ho.rows, ho.test_rows, ho.truth, ho.cut_of, ho.users, ho.cut
    seen = seen_before_cut(events, info.kind, t_of)
    eligible = Eligibility.of(rt.vocab, items)  # in the release and published before the user's cut

    # Stage 1: user tower on features as of each user's cut, then ANN.
    ucols = columns_from_join(joiner.join(pa.table({"user_id": users, "ts": t_user}), only=[rt.inputs.user_set]), [sets[rt.inputs.user_set]])
    U = np.stack([np.where(ucols[c][1], np.nan, ucols[c][0]) for c in rt.user_columns], axis=1).astype(np.float32)
    H = history_at(events, info.kind, users, t_user, rt.history_len) if rt.history_len else None  # the seen record's last items
    emb = rt.user_embeddings(U, H)
    max_seen = max((len(seen.get(int(u), ())) for u in users), default=0)
    policy = dataclasses.replace(_POLICY, retrieve_k=retrieve_k).for_release(rel.meta.candidates)  # the release's quotas, as the server
    cand_ids, _ = rt.retrieve(emb, ann_want(rt, policy, max_seen))
    Hii = history_at(events, info.kind, users, t_user, rt.item_item.history_len) if rt.item_item is not None and policy.n_item_item else None
    # Candidates by the server's own function (export.candidates): ANN, new items by content, fresh, popular.
    new = NewItems.of(rt, items)
    half = rel.meta.popularity_half_life_ms
    pops = popularity_lists(events, info.kind, users, t_user, seen, eligible, half, k)  # the popularity baseline, as of the cut
    pop_at = popularity_at(events, info.kind, t_user, half_life_ms=half)  # the popular source, as of each cut (the release's list saw the held-out slice)
    cands = []
    for r, (u, t) in enumerate(zip(users.tolist(), t_user.tolist())):
        s = seen.get(u, set())
        blocked = np.fromiter(s, dtype=np.int64, count=len(s))
        c = candidate_union(rt, emb[r], items, new, blocked, t, policy, ann_ids=cand_ids[r], history=Hii[r] if Hii is not None else None,
                            popular=pop_at[t])
        cands.append((c.ids, c.source))

    # Stage 2: rank every candidate with point-in-time features as of the user's cut.
    lists = ReleaseLists(users, t_user, emb, [c[0] for c in cands])
    cu, ci, ct = lists.rows()
    X = teacher_matrix(rt, joiner, used, events, info.kind, items, lists, new)  # incl. the list-relative retrieval columns
    scores = {r: rt.score(X, r) for r in RANKERS}
    ordered = ("release_order",) if rt.order != "ranker" else ()  # what the server serves, when not the int8 ranker's order
    if ordered:
        scores["release_order"] = rt.final_scores(X, "student_int8")

    acc: dict[str, list[tuple[float, float]]] = {name: [] for name in ("popularity", "two_tower", *RANKERS, *ordered)}
    off = 0
    for u, (ids, src), pop in zip(users.tolist(), cands, pops):
        n = len(ids)
        tset = truth[u]
        acc["popularity"].append(topk_metrics(pop, tset, k))
        acc["two_tower"].append(topk_metrics(ids[src == 0], tset, k))  # the ANN list alone, in its own order
        for r in (*RANKERS, *ordered):
            sc = scores[r][off : off + n]
            acc[r].append(topk_metrics(ids[np.lexsort((ids, -sc))], tset, k))
        off += n
    two_stage = {name: {"ndcg@10": float(np.mean([a for a, _ in v])), "recall@10": float(np.mean([b for _, b in v]))} for name, v in acc.items()}

    # Retrieval recall@100 over the full catalogue, and pointwise ranking quality on test rows.
    hit_exact = []
    exact = emb @ rt.item_embeddings.T
    top100 = rt.vocab[np.argsort(-exact, axis=1)[:, :100]]
    ann100, _ = rt.retrieve(emb, 100)
    hit_ann, agree = [], []
    for r, u in enumerate(users.tolist()):
        tset = truth[u]
        hit_exact.append(len(tset & set(top100[r].tolist())) / len(tset))
        hit_ann.append(len(tset & set(ann100[r].tolist())) / len(tset))
        agree.append(len(set(top100[r].tolist()) & set(ann100[r].tolist())) / len(top100[r]))
    retrieval = {"recall@100_exact": float(np.mean(hit_exact)), "recall@100_ann": float(np.mean(hit_ann)), "ann_vs_exact@100": float(np.mean(agree))}
    ranking = {}
    if rt.inputs.uses_retrieval:  # a ranker of candidate lists is measured on them: label = engaged in the held-out slice
        yt = np.fromiter((1.0 if i in truth[u] else 0.0 for u, i in zip(cu.tolist(), ci.tolist())), dtype=np.float64, count=len(ci))
        for r in RANKERS:
            ranking[r] = {"auc": auc(yt, scores[r]), "logloss": logloss(yt, scores[r])}
    else:
        Xt = feature_matrix(rt.inputs, joiner, used, items, rows.user_id[trow], rows.item_id[trow], rows.ts[trow])
        yt = rows.label[trow]
        for r in RANKERS:
            p = rt.score(Xt, r)
            ranking[r] = {"auc": auc(yt, p), "logloss": logloss(yt, p)}
    sizes = {r: rel.meta.files[f"rankers/{r}.onnx"].bytes for r in RANKERS}
    return EvalResult(rel.release_id, info.kind, len(users), two_stage, retrieval, ranking, sizes, time.perf_counter() - t_start)
