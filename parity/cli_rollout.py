"""`parity rollout`: start, watch, promote or abort a canary/shadow rollout on a running server.

    parity rollout set --target 127.0.0.1:50051 --canary releases/r2 --canary-percent 5 \\
        [--shadow releases/r3 --shadow-percent 10] [--salt S] [--auto-promote] [--threshold alpha=0.01 ...]
    parity rollout status  --target 127.0.0.1:50051
    parity rollout promote --target 127.0.0.1:50051
    parity rollout abort   --target 127.0.0.1:50051

Every command calls the Admin service (SetRollout / GetRollout) with the admin token
(`--token`, default env PARITY_ADMIN_TOKEN) and prints a short summary, then as its LAST
line the rollout status as one JSON object. The spec is validated here with the server's
own rules (server.rollout.RolloutSpec), so a bad value is reported with the option that
carried it before anything is sent. Exit codes: 0 done; 2 refused (a bad option, or the
server said INVALID_ARGUMENT, FAILED_PRECONDITION, PERMISSION_DENIED, UNAUTHENTICATED, ...);
1 the server could not be reached in time (UNAVAILABLE, DEADLINE_EXCEEDED).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from parity.argtypes import number

__all__ = ["OPTION_OF_FIELD", "parse_target", "parse_threshold", "register", "spec_from_args", "status_to_dict"]

# RolloutSpec field -> the option that sets it (so a server-side rule reads as a CLI error)
OPTION_OF_FIELD = {"primary": "--primary", "canary": "--canary", "canary_percent": "--canary-percent", "shadow": "--shadow",
                   "shadow_percent": "--shadow-percent", "salt": "--salt", "auto_promote": "--auto-promote", "thresholds": "--threshold"}


def parse_target(text: str) -> str:
    """HOST:PORT (IPv6 as [::1]:PORT), port 1..65535."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--target must be HOST:PORT with a port in 1..65535, got {text!r}")
    return text


def _percent(name: str) -> Callable[[str], float]:
    base = number(name)

    def parse(text: str) -> float:
        v = base(text)
        if v > 100:
            raise argparse.ArgumentTypeError(f"{name} must be a percentage in 0..100, got {text}")
        return v

    return parse


def parse_threshold(text: str) -> tuple[str, float]:
    """NAME=VALUE with a known guard threshold name and a finite value (ranges are checked with the spec)."""
    from server.canary_guard import GuardThresholds

    name, sep, value = text.partition("=")
    name = name.strip()
    known = GuardThresholds.names()
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--threshold must be NAME=VALUE (names: {', '.join(known)}), got {text!r}")
    if name not in known:
        raise argparse.ArgumentTypeError(f"--threshold {name}: unknown threshold; known: {', '.join(known)}")
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threshold {name}: value must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"--threshold {name}: value must be finite, got {value!r}")
    return name, v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, type=parse_target, help="HOST:PORT of the server")
    p.add_argument("--admin-token", "--token", dest="token", default=None, help="admin bearer token (default: env PARITY_ADMIN_TOKEN)")
    p.add_argument("--timeout", type=number("--timeout", strictly_positive=True), default=10.0,
                   help="deadline of the call in seconds (default 10)")


def register(sub: argparse._SubParsersAction, positive: Callable, nonneg: Callable) -> None:
    del positive, nonneg  # no integer options
    p = sub.add_parser("rollout", help="canary and shadow rollouts on a running server (Admin SetRollout/GetRollout)",
                       description="Start, watch, promote or abort a rollout. The last line printed is JSON.")
    rsub = p.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    s = rsub.add_parser("set", help="start (or replace) a rollout: a canary share of users and/or a shadow share of requests",
                        description="Users are assigned to the canary by a consistent hash of their id and the salt, so a "
                        "user stays in one arm. The canary guard rolls the canary back on its own when it hurts.")
    _common(s)
    s.add_argument("--primary", default="", help="primary release (path under the releases root, or id; default: keep the current one)")
    s.add_argument("--canary", default="", help="canary release (path under the releases root, or id)")
    s.add_argument("--canary-percent", type=_percent("--canary-percent"), default=None, help="share of users on the canary, 0..100")
    s.add_argument("--shadow", default="", help="shadow release: also run after the answer is sent, never changes it")
    s.add_argument("--shadow-percent", type=_percent("--shadow-percent"), default=None, help="share of requests shadowed, 0..100")
    s.add_argument("--salt", default="", help="assignment salt, printable, at most 64 characters (default: a fresh one)")
    s.add_argument("--auto-promote", action="store_true", help="promote the canary after a clean guard period")
    s.add_argument("--threshold", type=parse_threshold, action="append", default=[], metavar="NAME=VALUE",
                   help="canary guard override, repeatable (names: see server/canary_guard.py)")
    s.set_defaults(func=_set)
    for name, helptext, func in (("status", "show the rollout, its arms' numbers and the last decision", _status),
                                 ("promote", "make the canary the primary for everyone", _promote),
                                 ("abort", "drop canary and shadow; the primary stays", _abort)):
        a = rsub.add_parser(name, help=helptext, description=helptext + ". The last line printed is JSON.")
        _common(a)
        a.set_defaults(func=func)


# -- validation --------------------------------------------------------------------------------
class UsageError(ValueError):
    """A bad combination of options; the message starts with the option."""


def spec_from_args(args: argparse.Namespace):
    """The RolloutSpec the options describe, validated with the server's rules; a problem
    raises UsageError naming the option."""
    from server.errors import InvalidArgument
    from server.rollout import RolloutSpec

    if args.canary and args.canary_percent is None:
        raise UsageError("--canary-percent is required with --canary")
    if args.canary_percent is not None and not args.canary:
        raise UsageError("--canary-percent needs --canary (the release to give that share of users)")
    if args.shadow and args.shadow_percent is None:
        raise UsageError("--shadow-percent is required with --shadow")
    if args.shadow_percent is not None and not args.shadow:
        raise UsageError("--shadow-percent needs --shadow (the release to run in shadow)")
    names = [n for n, _ in args.threshold]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"--threshold {dup[0]}: given more than once")
    try:
        return RolloutSpec(primary=args.primary, canary=args.canary, canary_percent=args.canary_percent or 0.0, shadow=args.shadow,
                           shadow_percent=args.shadow_percent or 0.0, salt=args.salt, auto_promote=bool(args.auto_promote),
                           thresholds=dict(args.threshold))
    except InvalidArgument as exc:
        _, _, problem = str(exc).partition(": ")
        head, _, sub = exc.field.partition(".")
        option = OPTION_OF_FIELD.get(head, exc.field) + (f" {sub}" if sub else "")
        raise UsageError(f"{option}: {problem}") from None


def _token(args: argparse.Namespace) -> str:
    tok = args.token if args.token is not None else os.environ.get("PARITY_ADMIN_TOKEN", "")
    if not tok:
        raise UsageError("--token (or env PARITY_ADMIN_TOKEN) is required: Admin calls need the server's admin token")
    return tok


# -- the calls ---------------------------------------------------------------------------------
def status_to_dict(resp: Any) -> dict[str, Any]:
    """A parity.v1.RolloutStatus as plain JSON-able values (every field, defaults included)."""
    decision: Any = resp.last_decision
    if decision:
        try:
            decision = json.loads(decision)
        except json.JSONDecodeError:
            pass
    return {
        "state": resp.state, "version": int(resp.version), "primary_release_id": resp.primary_release_id,
        "canary_release_id": resp.canary_release_id, "canary_percent": resp.canary_percent, "shadow_release_id": resp.shadow_release_id,
        "shadow_percent": resp.shadow_percent, "salt": resp.salt,
        "arms": [{"arm": a.arm, "release_id": a.release_id, "requests": int(a.requests), "errors": int(a.errors), "p99_ms": a.p99_ms,
                  "missing_rate": a.missing_rate, "prediction_psi": a.prediction_psi, "ctr": a.ctr,
                  "watch_s_per_request": a.watch_s_per_request} for a in resp.arms],
        "last_decision": decision or None, "shadow": dict(resp.shadow),
    }


def _admin(args: argparse.Namespace, method: str, request: Any) -> Any:
    import grpc

    from parity_api.v1 import recommender_pb2_grpc as pb_grpc

    md = [("authorization", f"Bearer {_token(args)}")]
    with grpc.insecure_channel(args.target) as channel:
        return getattr(pb_grpc.AdminStub(channel), method)(request, timeout=args.timeout, metadata=md)


def _run(args: argparse.Namespace, method: str, make_request: Callable[[], Any]) -> int:
    import grpc

    cmd = f"parity rollout {args.rollout_command}"
    try:
        request = make_request()
        resp = _admin(args, method, request)
    except UsageError as exc:
        print(f"{cmd}: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        code = exc.code()
        print(f"{cmd}: error: {code.name}: {exc.details() or ''} (target {args.target})", file=sys.stderr)
        return 1 if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else 2
    out = status_to_dict(resp)
    print(f"rollout {out['state']} (version {out['version']}): primary {out['primary_release_id'] or '-'}, "
          f"canary {out['canary_release_id'] or '-'} at {out['canary_percent']:g} %, "
          f"shadow {out['shadow_release_id'] or '-'} at {out['shadow_percent']:g} %")
    for a in out["arms"]:
        print(f"  {a['arm']:8s} {a['release_id'] or '-'}: {a['requests']} requests, {a['errors']} errors, p99 {a['p99_ms']:.1f} ms, "
              f"missing {a['missing_rate']:.3f}, PSI {a['prediction_psi']:.3f}, CTR {a['ctr']:.4f}, watch {a['watch_s_per_request']:.1f} s/request")
    if out["last_decision"]:
        reason = out["last_decision"].get("reason") if isinstance(out["last_decision"], dict) else out["last_decision"]
        print(f"  last decision: {reason}")
    print(json.dumps(out, sort_keys=True))
    return 0


def _set(args: argparse.Namespace) -> int:
    from parity_api.v1 import recommender_pb2 as pb

    def request():
        spec = spec_from_args(args)
        _token(args)  # before any network
        return pb.SetRolloutRequest(spec=pb.RolloutSpec(primary=spec.primary, canary=spec.canary, canary_percent=spec.canary_percent,
                                                        shadow=spec.shadow, shadow_percent=spec.shadow_percent, salt=spec.salt,
                                                        auto_promote=spec.auto_promote, thresholds=dict(spec.thresholds)))

    return _run(args, "SetRollout", request)


def _status(args: argparse.Namespace) -> int:
    from parity_api.v1 import recommender_pb2 as pb

    return _run(args, "GetRollout", lambda: (_token(args), pb.GetRolloutRequest())[1])


def _promote(args: argparse.Namespace) -> int:
    from parity_api.v1 import recommender_pb2 as pb

    return _run(args, "SetRollout", lambda: (_token(args), pb.SetRolloutRequest(promote=True))[1])


def _abort(args: argparse.Namespace) -> int:
    from parity_api.v1 import recommender_pb2 as pb

    return _run(args, "SetRollout", lambda: (_token(args), pb.SetRolloutRequest(abort=True))[1])
