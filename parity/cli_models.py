"""`parity train`, `parity releases ...`, `parity eval`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from parity.engine_args import add_engine_args, engine_from_args
from parity.output import Output


def register(sub: argparse._SubParsersAction, positive, nonneg) -> None:
    p = sub.add_parser("train", help="train a release: two-tower + ScaNN, teacher, distilled int8 student (prints the release path)",
                       description="Builds point-in-time training data from the event log, trains and checks every model, and "
                       "writes an immutable release folder under --out. Prints the release path as the last line.")
    p.add_argument("--events", required=True, help="data dir (or its events/ folder)")
    p.add_argument("--out", required=True, help="releases folder; the release is written to OUT/<release id>")
    p.add_argument("--profile", default="default", choices=("tiny", "small", "default"), help="model sizes and data cap (default: default)")
    p.add_argument("--seed", type=nonneg("--seed"), default=0, help="random seed (default 0)")
    add_engine_args(p)  # the point-in-time join of the training rows
    p.set_defaults(func=_train, outputs=lambda a: [Output.of(a.out)])

    r = sub.add_parser("releases", help="list and inspect releases").add_subparsers(dest="releases_command", required=True, metavar="ACTION")
    p = r.add_parser("list", help="valid releases under a folder, newest first, then broken folders (BROKEN FOLDER: REASON)")
    p.add_argument("--root", default="releases", help="releases folder (default ./releases)")
    p.set_defaults(func=_list)
    p = r.add_parser("show", help="a release's manifest (checked against its files)")
    p.add_argument("release", help="release id (under --root) or a release folder")
    p.add_argument("--root", default="releases", help="releases folder (default ./releases)")
    p.set_defaults(func=_show)

    p = sub.add_parser("eval", help="evaluate a release on the held-out time slice (last line: JSON)")
    p.add_argument("--release", required=True, help="release folder")
    p.add_argument("--events", required=True, help="data dir the release was trained on")
    p.add_argument("--max-users", type=positive("--max-users"), default=None, help="evaluate a seeded sample of users")
    p.add_argument("--protocol", action="store_true", help="also report MovieLens under the published protocol (random 80/20, full ranking)")
    p.add_argument("--device", action="store_true",
                   help="also the device path: distil the tiny on-device ranker and rank each user's retrieval candidates with it")
    p.add_argument("--peers", action="store_true",
                   help="also implicit's ALS and BPR, ItemKNN and EASE, tuned on a validation split of the training part and "
                   "scored on the same split (with --protocol: on the random 80/20 split too); needs the eval extra")
    p.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from pipeline.train import train_release
    from parity.workspace import open_workspace

    ws = open_workspace(args.events)
    logging.getLogger("pipeline.train").setLevel(logging.INFO)  # step timings to stderr
    with engine_from_args(args, "parity train") as engine:
        rel = train_release(ws.data_dir, args.out, profile=args.profile, seed=args.seed, engine=engine)
    m = rel.manifest["metrics"]
    rt = m["ranking_test"]
    print(f"release {rel.release_id}: {rel.manifest['training_data']['rows']} rows, fingerprint {rel.manifest['training_data']['fingerprint']}")
    print(f"  retrieval recall@100 (test): two-tower {m['retrieval']['recall@100_test_two_tower']:.3f}, popularity {m['retrieval']['recall@100_test_popularity']:.3f}, ANN vs exact {m['retrieval']['ann_recall@100_vs_exact']:.3f}")
    for name, v in rt.items():
        print(f"  {name:<13} AUC {v['auc']:.4f}  logloss {v['logloss']:.4f}")
    print(rel.path)
    return 0


def _resolve(arg: str, root: str) -> tuple[Path, bool]:
    """(folder, named by id under --root). A path that cannot even be stat'ed is left to
    load_release, which refuses it with the reason."""
    p = Path(arg)
    try:
        if p.is_dir():
            return p, False
    except (OSError, ValueError):
        return p, False
    return Path(root) / arg, True


def _list(args: argparse.Namespace) -> int:
    from export.release import scan_releases

    scan = scan_releases(args.root)
    if not scan.valid and not scan.broken:
        print(f"no releases under {args.root}")
    for r in scan.valid:
        s = r.summary()
        auc = None if s.int8_auc is None else round(s.int8_auc, 4)
        print(f"{s.release_id}  {s.dataset_kind:<10} profile={s.profile or '?':<8} seed={s.seed}  int8 AUC={auc}  {r.path}")
    for b in scan.broken:
        print(f"BROKEN {b.path}: {b.reason}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from export.release import load_release

    path, by_id = _resolve(args.release, args.root)
    rel = load_release(path, require_folder_name=by_id)
    m = dict(rel.manifest)
    m.pop("reference", None)  # large; kept in the file
    print(json.dumps(m, indent=2, sort_keys=True))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate_release
    from parity.workspace import open_workspace

    if args.peers:
        from models.peers import MissingExtra, require_implicit

        try:
            require_implicit()
        except MissingExtra as exc:
            print(f"parity: error: --peers: {exc}", file=sys.stderr)
            return 2
    ws = open_workspace(args.events)
    res = evaluate_release(args.release, ws.data_dir, max_users=args.max_users)
    out = res.summary()
    print(f"release {res.release_id} on {res.dataset}: {res.users} users, held-out slice ({res.seconds:.1f} s)")
    print(f"{'model':<14} {'NDCG@10':>8} {'recall@10':>10} {'AUC':>7} {'logloss':>8} {'bytes':>9}")
    for name, v in res.two_stage.items():
        rk = res.ranking.get(name, {})
        print(f"{name:<14} {v['ndcg@10']:>8.4f} {v['recall@10']:>10.4f} {rk.get('auc', float('nan')):>7.4f} {rk.get('logloss', float('nan')):>8.4f} {res.sizes.get(name, 0):>9}")
    print(f"retrieval recall@100 over the catalogue: exact {res.retrieval['recall@100_exact']:.4f}, ANN {res.retrieval['recall@100_ann']:.4f} (ANN vs exact overlap {res.retrieval['ann_vs_exact@100']:.4f})")
    pop = res.two_stage["popularity"]["ndcg@10"]
    teacher, int8 = res.two_stage["teacher_fp32"]["ndcg@10"], res.two_stage["student_int8"]["ndcg@10"]
    out["targets"] = {
        "int8_within_1pct_of_teacher": bool(int8 >= 0.99 * teacher),
        "two_stage_vs_popularity": (int8 / pop) if pop > 0 else None,
        "int8_size_vs_teacher": res.sizes["student_int8"] / res.sizes["teacher_fp32"],
    }
    if args.peers:
        from pipeline.peers import time_split_peers

        peers = time_split_peers(args.release, ws.data_dir, max_users=args.max_users)
        out["peers"] = {"time_split": peers}
        _print_peers(f"peers on the held-out slice ({peers['users']} users, tuned on the validation part, {peers['seconds']:.1f} s)",
                     {**{f"parity {k}": v for k, v in res.two_stage.items() if k != "popularity"}, **peers["peers"]})
    if args.device:
        import tempfile

        from pipeline.device_eval import evaluate_device
        from export.device.tiny_model import build_device_model

        with tempfile.TemporaryDirectory(prefix="parity-eval-device-") as tmp:
            model = build_device_model(args.release, ws.data_dir, tmp)
            dev = evaluate_device(args.release, ws.data_dir, model, max_users=args.max_users, server=res)
        out["device"] = dev
        r = dev["ratios"]
        print(f"device_int8    {dev['device_int8']['ndcg@10']:>8.4f} {dev['device_int8']['recall@10']:>10.4f}   "
              f"{r['device_over_server_ndcg']:.2f}x the server's two-stage, {r['device_over_popularity_ndcg']:.2f}x popularity "
              f"({model.bytes['int8']} bytes int8)")
    if args.protocol:
        from pipeline.protocol_eval import published_protocol

        out["published_protocol"] = published_protocol(ws.data_dir, args.release)
        for name, v in out["published_protocol"].items():
            print(f"published protocol {name:<12} NDCG@10 {v['ndcg@10']:.4f} recall@10 {v['recall@10']:.4f}")
        if args.peers:
            from export.release import load_release
            from pipeline.peers import protocol_peers

            pp = protocol_peers(ws.data_dir, seed=load_release(args.release).meta.seed)
            out["peers"]["published_protocol"] = pp
            _print_peers(f"published protocol, random 80/20 ({pp['users']} users, tuned on 12.5% of the training 80%, {pp['seconds']:.1f} s)",
                         {**{f"parity {k.removeprefix('parity_')}": v for k, v in out["published_protocol"].items() if k != "popularity"}, **pp["peers"]})
    print(json.dumps(out, sort_keys=True))
    return 0


def _print_peers(title: str, rows: dict[str, dict]) -> None:
    """One table: model, NDCG@10, recall@10, the settings chosen on validation."""
    print(title)
    print(f"  {'model':<28} {'NDCG@10':>8} {'recall@10':>10}  settings (chosen on validation)")
    for name, v in sorted(rows.items(), key=lambda kv: -kv[1]["ndcg@10"]):
        settings = ", ".join(f"{k}={x}" for k, x in v.get("settings", {}).items())
        print(f"  {name:<28} {v['ndcg@10']:>8.4f} {v['recall@10']:>10.4f}  {settings}")
