"""`parity privacy delete-user`: erase one user everywhere, with an audit record.

Against a running server (`--target`), the server does it (its event log, offline views,
online store, served log and its caches, so their next request is a new user's); without
one, the same erasure runs here on a data dir, a store and a served-log folder. Either way
the next `parity export delta` tombstones the user's device files (it reads the audit).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction, positive, nonneg) -> None:
    p = sub.add_parser("privacy", help="erase a user everywhere (event log, offline, online store, served log, caches, device bundles)")
    psub = p.add_subparsers(dest="privacy_command", required=True, metavar="ACTION")
    d = psub.add_parser("delete-user", help="erase one user's data everywhere Parity keeps it (audited)")
    d.add_argument("--user", type=nonneg("--user"), required=True, help="user id")
    d.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    d.add_argument("--target", default=None, help="HOST:PORT of a running server: it erases what it holds, caches included")
    d.add_argument("--admin-token", default=None, help="with --target: the Admin token (default: env PARITY_ADMIN_TOKEN)")
    d.add_argument("--events", default=None, help="without --target: the data dir")
    d.add_argument("--store", default="memory", help="without --target: the online store (memory or redis://HOST:PORT/DB)")
    d.add_argument("--namespace", default="parity", help="without --target: key namespace (default parity)")
    d.add_argument("--served-log", default=None, help="without --target: the served-log folder to erase the user from")
    d.set_defaults(func=_delete_user)


def _delete_user(args: argparse.Namespace) -> int:
    if not args.reason.strip():
        raise ValueError("--reason must say why the user's data is erased (it goes into the audit log)")
    if args.target:
        if args.events or args.served_log:
            raise ValueError("--target: the server erases its own data dir and served log; drop --events / --served-log")
        from server.client import ParityClient

        token = args.admin_token or os.environ.get("PARITY_ADMIN_TOKEN") or None
        if not token:
            raise ValueError("--admin-token (or env PARITY_ADMIN_TOKEN) is required with --target")
        with ParityClient(args.target, timeout_s=300.0, admin_token=token) as c:
            print(json.dumps({"user_id": args.user, **c.delete_user(args.user, args.reason)}, sort_keys=True))
        return 0
    if not args.events:
        raise ValueError("--events (the data dir) is required without --target")
    from parity.cli_features import _store
    from parity.workspace import open_workspace
    from server.erasure import erase_user

    ws = open_workspace(args.events)
    if args.served_log and not Path(args.served_log).is_dir():
        raise ValueError(f"--served-log {args.served_log}: no such folder")
    with _store(args.store, args.namespace) as store:
        rep = erase_user(args.user, reason=args.reason, actor="cli", log=ws.log, store=store, sets=ws.sets, offline=ws.offline,
                         served_log=args.served_log)
    print(json.dumps(rep.to_json(), sort_keys=True))
    return 0
