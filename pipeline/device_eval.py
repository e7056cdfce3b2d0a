"""The device path's quality, beside the server's, on the held-out slice `parity eval` uses.

Same users and cut times as `pipeline.evaluate.evaluate_release` (each user's test start; the
same `max_users` sample for the same seed). Device candidates: the release's retrieval
top-200 as of the cut with seen and unpublished items removed (what a user file's
`candidates` holds, `export.device.lists`), ranked by the tiny int8 model on device inputs as
of the cut (user embedding and item embeddings int8 round-tripped, item statistics and
session features point-in-time). The server's two-stage numbers (student_int8, popularity,
two_tower) come from `evaluate_release` in the same call, untouched. numpy + ONNX Runtime.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from export.device.inputs import DeviceFeatureSource
from export.device.lists import device_item_item, list_item_item, release_lists, teacher_matrix
from export.device.quant import int8_round_trip
from export.device.tiny_model import DeviceModel, device_session
from export.device.training_rows import ItemEmbeddingTable, check_feature_sets
from export.onnx_export import ort_score
from export.release import ReleaseError, load_release
from export.runtime import ReleaseRuntime
from features.catalog import ItemCatalog
from features.datasets import load_info, read_items
from features.eventlog import EventLog
from features.pit import PitJoiner
from features.repo import feature_sets
from pipeline.evaluate import EvalResult, evaluate_release
from pipeline.heldout import held_out, topk_metrics

__all__ = ["evaluate_device"]


def evaluate_device(release_dir: str | Path, data_dir: str | Path, model: DeviceModel, *, k: int = 10,
                    max_users: int | None = None, seed: int = 0, retrieve_k: int = 200, server: EvalResult | None = None) -> dict:
    """{"users", "device_int8", "server_student_int8", "popularity", "two_tower", "ratios", ...}: NDCG@k and recall@k each.
    `server_student_int8_on_device_pool` (a diagnostic) ranks the device's candidates with the server's student."""
    rel = load_release(release_dir)
    if rel.release_id != model.release_id:
        raise ReleaseError(f"the device model was distilled from release {model.release_id}, not {rel.release_id}")
    info = load_info(data_dir)
    check_feature_sets(rel, info.kind, info.n_topics)
    if server is None:  # `server`: evaluate_release's result for the same arguments, when the caller has it
        server = evaluate_release(release_dir, data_dir, retrieve_k=retrieve_k, k=k, max_users=max_users, seed=seed)
    rt = ReleaseRuntime.load(rel, rankers=("student_int8",))
    events = EventLog(Path(data_dir) / "events").read(must_exist=True).deduplicated()
    items = ItemCatalog.from_table(read_items(data_dir))
    # the held-out users and cuts, chosen exactly as evaluate_release chooses them (pipeline.heldout)
    ho = held_out(rel, info.kind, events, items, max_users=max_users, seed=seed)
    users, t_user, truth = ho.users, ho.cut, ho.truth
    if len(users) != server.users:
        raise RuntimeError(f"device evaluation picked {len(users)} users, evaluate_release {server.users}: the selection drifted")
    sets = {fs.name: fs for fs in feature_sets(info.kind, info.n_topics)}
    used = [sets[n] for n in rt.inputs.sets]
    joiner = PitJoiner(used, events)
    lists = release_lists(rt, joiner, sets[rt.inputs.user_set], events, info.kind, items, users, t_user, retrieve_k)
    cu, ci, ct = lists.rows()
    n = np.asarray([len(x) for x in lists.ids])
    sparse = device_item_item(rt) if "item.item_item" in model.columns else None
    ii = list_item_item(sparse, events, info.kind, lists) if sparse is not None else None
    X = DeviceFeatureSource(info.kind, info.n_topics, events, items).matrix(
        np.repeat(int8_round_trip(lists.user_emb), n, axis=0), ItemEmbeddingTable(rt, items)(ci), cu, ci, ct, np.repeat(np.arange(len(n)), n), ii)
    scores = ort_score(device_session(model.int8_path), X)
    # diagnostic: the server's student on the device's pool (no popular/fresh extras): pool vs ranker
    same_pool = rt.score(teacher_matrix(rt, joiner, used, events, info.kind, items, lists), "student_int8")

    def metrics(sc_all: np.ndarray) -> dict[str, float]:
        acc, off = [], 0
        for u, ids in zip(users.tolist(), lists.ids):
            sc = sc_all[off:off + len(ids)]
            acc.append(topk_metrics(ids[np.lexsort((ids, -sc))], truth[u], k))
            off += len(ids)
        return {f"ndcg@{k}": float(np.mean([a for a, _ in acc])), f"recall@{k}": float(np.mean([b for _, b in acc]))}

    dev = metrics(scores)
    srv = server.two_stage["student_int8"]
    pop = server.two_stage["popularity"]
    key = f"ndcg@{k}"
    return {
        "release_id": rel.release_id, "dataset": info.kind, "users": int(len(users)), "k": k,
        "device_int8": dev, "server_student_int8": {key: srv["ndcg@10"], f"recall@{k}": srv["recall@10"]},
        "server_teacher_fp32": dict(server.two_stage["teacher_fp32"]),
        "server_student_int8_on_device_pool": metrics(same_pool),
        "popularity": {key: pop["ndcg@10"], f"recall@{k}": pop["recall@10"]}, "two_tower": dict(server.two_stage["two_tower"]),
        "ratios": {"device_over_server_ndcg": dev[key] / srv["ndcg@10"] if srv["ndcg@10"] else float("nan"),
                   "device_over_popularity_ndcg": dev[key] / pop["ndcg@10"] if pop["ndcg@10"] else float("nan")},
        "device_model": {"hidden": list(model.hidden), "bytes": dict(model.bytes)},
    }


def _main(argv=None) -> int:
    """`python -m pipeline.device_eval RELEASE DATA OUT [--seed S]`: build the tiny ranker, print one JSON report."""
    import argparse
    import json

    from export.device.tiny_model import build_device_model

    p = argparse.ArgumentParser(prog="python -m pipeline.device_eval", description=_main.__doc__)
    p.add_argument("release_dir")
    p.add_argument("data_dir")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-users", type=int, default=None)
    a = p.parse_args(argv)
    model = build_device_model(a.release_dir, a.data_dir, a.out_dir, seed=a.seed)
    report = evaluate_device(a.release_dir, a.data_dir, model, max_users=a.max_users, seed=a.seed)
    report["build"] = {"seconds": round(model.seconds, 1), "rows": model.rows, "tried": model.tried, "valid": model.valid,
                       "checks": model.checks.__dict__}
    print(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
