"""`parity export ...`: device bundles (keygen, token, device, delta, serve)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from parity.output import Output

__all__ = ["register"]


def register(sub: argparse._SubParsersAction, positive, nonneg) -> None:
    e = sub.add_parser("export", help="device bundles: signing keys, user tokens, full and delta exports, a CDN stand-in")
    a = e.add_subparsers(dest="export_command", required=True, metavar="ACTION")
    p = a.add_parser("keygen", help="write an Ed25519 signing key pair and a path secret into a folder")
    p.add_argument("--out", required=True, help="key folder (signing.key, signing.pub, path.secret)")
    p.add_argument("--force", action="store_true", help="replace existing keys (devices trusting the old key refuse new bundles)")
    p.set_defaults(func=_keygen, outputs=lambda a: [Output.of(a.out)])

    p = a.add_parser("token", help="print a user's token (the CDN path component a backend hands to the device at login)")
    p.add_argument("--keys", required=True, help="key folder")
    p.add_argument("--user", required=True, type=nonneg("--user"), help="user id")
    p.set_defaults(func=_token)

    p = a.add_parser("device", help="export a release's device bundle: tiny ranker, item table, per-user files, signed manifest")
    p.add_argument("--release", required=True, help="release folder")
    p.add_argument("--events", required=True, help="data dir the release was trained on (its event log and catalogue)")
    p.add_argument("--keys", required=True, help="key folder (parity export keygen)")
    p.add_argument("--out", required=True, help="bundle folder (new, empty, or an earlier bundle of these keys)")
    p.add_argument("--users", default="all", help="'all' (every user of the log) or a file of user ids, one per line")
    p.add_argument("--seed", type=nonneg("--seed"), default=0, help="seed of the tiny ranker's distillation (default 0)")
    p.add_argument("--profile", choices=("tiny", "default"), default="default",
                   help="tiny ranker search: default (widths and label weights chosen on validation lists) or tiny (one small net; tests)")
    p.set_defaults(func=_device, outputs=lambda a: [Output.of(a.out)])

    p = a.add_parser("delta", help="bring a bundle up to the event log without retraining (new items, changed and erased users)")
    p.add_argument("--bundle", required=True, help="bundle folder")
    p.add_argument("--events", required=True, help="data dir")
    p.add_argument("--keys", required=True, help="key folder that signed the bundle")
    p.add_argument("--release", default=None, help="the bundle's release folder (default: DATA/../releases/ID or ./releases/ID)")
    p.set_defaults(func=_delta, outputs=lambda a: [Output.of(a.bundle)])

    p = a.add_parser("serve", help="serve a bundle over HTTP like a CDN (ETag, If-None-Match, Range, Cache-Control)")
    p.add_argument("--bundle", required=True, help="bundle folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=nonneg("--port"), default=8080, help="port (default 8080; 0 = any free port)")
    p.set_defaults(func=_serve)


def _keygen(args: argparse.Namespace) -> int:
    from export.device.keys import keygen

    keys = keygen(args.out, force=args.force)
    print(json.dumps({"keys": str(Path(args.out)), "key_id": keys.key_id}))
    return 0


def _token(args: argparse.Namespace) -> int:
    from export.device.keys import load_keys

    print(load_keys(args.keys).token(args.user))
    return 0


def _read_users(spec: str):
    import numpy as np

    if spec == "all":
        return None
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"--users: {spec!r} is neither 'all' nor a file of user ids")
    ids = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            v = int(line)
        except ValueError:
            raise ValueError(f"--users: {p}:{n}: {line[:40]!r} is not a user id") from None
        if v < 0:
            raise ValueError(f"--users: {p}:{n}: user ids are >= 0, got {v}")
        ids.append(v)
    return np.asarray(ids, dtype=np.int64)


def _device(args: argparse.Namespace) -> int:
    from export.device.bundle import export_device
    from export.device.keys import load_keys
    from export.device.tiny_model import build_device_model

    keys = load_keys(args.keys)
    users = _read_users(args.users)
    with tempfile.TemporaryDirectory(prefix="parity-device-") as tmp:
        model = build_device_model(args.release, args.events, tmp, seed=args.seed, profile=None if args.profile == "default" else "tiny")
        rep = export_device(args.release, args.events, keys, args.out, model, users=users)
    print(json.dumps(rep.summary(), sort_keys=True))
    return 0


def _delta(args: argparse.Namespace) -> int:
    from export.device.bundle import export_delta
    from export.device.keys import load_keys

    rep = export_delta(args.bundle, args.events, load_keys(args.keys), release_dir=args.release)
    print(json.dumps(rep.summary(), sort_keys=True))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from export.device.cdn import serve_bundle

    if not (Path(args.bundle) / "manifest.json").is_file():
        raise ValueError(f"--bundle: {args.bundle} has no manifest.json (not a bundle)")
    print(f"serving {args.bundle} on http://{args.host}:{args.port}/ (Ctrl-C stops)", file=sys.stderr)
    serve_bundle(args.bundle, args.host, args.port)
    return 0
