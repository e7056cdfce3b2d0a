"""`parity rollout`: options are checked (with the server's own spec rules) before anything is
sent, errors name the option, and each action prints the rollout status as JSON last."""
from __future__ import annotations

import argparse
import json
from concurrent import futures

import grpc
import pytest

from features.online.memory import MemoryStore
from parity.argtypes import nonneg, positive
from parity.cli_rollout import register
from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc
from server.errors import FailedPrecondition, InvalidArgument
from server.rollout import Rollout, RolloutSpec, RolloutStore

TOKEN = "t0ken"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parity")
    register(p.add_subparsers(dest="command", required=True), positive, nonneg)
    return p


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def _parse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


T = ["--target", "127.0.0.1:1", "--token", TOKEN]


# -- argument validation ------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["rollout", "set", "--canary", "r2", "--canary-percent", "5"], "--target"),
    (["rollout", "set", *T[:1], "localhost", "--canary", "r2"], "--target must be HOST:PORT"),
    (["rollout", "set", *T, "--canary", "r2", "--canary-percent", "101"], "--canary-percent must be a percentage in 0..100"),
    (["rollout", "set", *T, "--canary", "r2", "--canary-percent", "nan"], "--canary-percent must be a finite number"),
    (["rollout", "set", *T, "--canary", "r2", "--canary-percent", "-3"], "--canary-percent"),
    (["rollout", "set", *T, "--shadow", "r3", "--shadow-percent", "x"], "--shadow-percent must be a number"),
    (["rollout", "set", *T, "--canary", "r2", "--canary-percent", "5", "--threshold", "p99=2"], "--threshold p99: unknown threshold"),
    (["rollout", "set", *T, "--canary", "r2", "--canary-percent", "5", "--threshold", "alpha"], "--threshold must be NAME=VALUE"),
    (["rollout", "set", *T, "--canary", "r2", "--canary-percent", "5", "--threshold", "alpha=inf"], "--threshold alpha: value must be finite"),
    (["rollout", "status", "--token", TOKEN], "--target"),
    (["rollout", "promote", *T, "--timeout", "0"], "--timeout must be a finite number > 0"),
])
def test_a_bad_option_is_refused_by_the_parser_with_its_name(argv, expected, capsys):
    assert expected in _parse_error(argv, capsys)


@pytest.mark.parametrize("argv, expected", [
    (["--canary", "r2"], "--canary-percent is required with --canary"),
    (["--canary-percent", "5"], "--canary-percent needs --canary"),
    (["--shadow", "r3"], "--shadow-percent is required with --shadow"),
    (["--shadow-percent", "5"], "--shadow-percent needs --shadow"),
    ([], "--canary: a rollout needs a canary or a shadow release"),
    (["--canary", "r2", "--canary-percent", "5", "--salt", "s" * 65], "--salt: must be at most 64 characters"),
    (["--canary", " r2", "--canary-percent", "5"], "--canary: must be printable without leading or trailing spaces"),
    (["--canary", "r2", "--canary-percent", "5", "--threshold", "alpha=0"], "--threshold alpha: must be in (0, 0.5]"),
    (["--canary", "r2", "--canary-percent", "5", "--threshold", "min_requests=2.5"], "--threshold min_requests: must be a whole number"),
    (["--canary", "r2", "--canary-percent", "5", "--threshold", "alpha=0.1", "--threshold", "alpha=0.2"], "--threshold alpha: given more than once"),
    (["--shadow", "r3", "--shadow-percent", "5", "--auto-promote"], "--auto-promote: needs a canary release"),
])
def test_a_bad_spec_is_refused_before_anything_is_sent(argv, expected, capsys):
    assert _run(["rollout", "set", *T, *argv]) == 2  # the target is a closed port: a sent call would be UNAVAILABLE (exit 1)
    err = capsys.readouterr().err
    assert err.startswith("parity rollout set: error: ") and expected in err, err


def test_without_a_token_nothing_is_sent(capsys, monkeypatch):
    monkeypatch.delenv("PARITY_ADMIN_TOKEN", raising=False)
    assert _run(["rollout", "status", "--target", "127.0.0.1:1"]) == 2
    assert "--token (or env PARITY_ADMIN_TOKEN) is required" in capsys.readouterr().err


def test_an_unreachable_server_is_exit_1_with_the_code(capsys):
    assert _run(["rollout", "status", *T, "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


# -- against a stand-in Admin service (the rollout logic, no recommender) ------------------------
class _FakeAdmin(pb_grpc.AdminServicer):
    """SetRollout/GetRollout over server.rollout, as the real servicer will wire them."""

    def __init__(self) -> None:
        self.rollouts = RolloutStore(MemoryStore("cli"))
        self.rollouts.initialise("rel-a", now_ms=1)
        self.now = 1

    def _status(self, r: Rollout) -> pb.RolloutStatus:
        return pb.RolloutStatus(**r.to_status(), arms=[pb.ArmStats(arm="primary", release_id=r.primary, requests=3)])

    def _guard(self, context) -> None:
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")

    def SetRollout(self, request, context):
        self._guard(context)
        self.now += 1
        try:
            which = request.WhichOneof("action")
            if which == "spec":
                spec = RolloutSpec.from_message(request.spec)
                r = self.rollouts.update(lambda cur: cur.start(spec, self.now))
            elif which == "promote":
                r = self.rollouts.update(lambda cur: cur.promote(self.now))
            else:
                r = self.rollouts.update(lambda cur: cur.abort(self.now))
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FailedPrecondition as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return self._status(r)

    def GetRollout(self, request, context):
        self._guard(context)
        return self._status(self.rollouts.load())


@pytest.fixture
def fake_target():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AdminServicer_to_server(_FakeAdmin(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_set_status_promote_then_abort_is_refused(fake_target, capsys, monkeypatch):
    monkeypatch.setenv("PARITY_ADMIN_TOKEN", TOKEN)  # the env is the default token
    t = ["--target", fake_target]
    assert _run(["rollout", "set", *t, "--canary", "rel-b", "--canary-percent", "5", "--salt", "s", "--threshold", "alpha=0.01"]) == 0
    out = _last_json(capsys)
    assert (out["state"], out["version"], out["canary_release_id"], out["canary_percent"], out["salt"]) == ("canary", 2, "rel-b", 5.0, "s")
    assert _run(["rollout", "status", *t]) == 0
    out = _last_json(capsys)
    assert out["arms"][0] == {"arm": "primary", "release_id": "rel-a", "requests": 3, "errors": 0, "p99_ms": 0.0, "missing_rate": 0.0,
                              "prediction_psi": 0.0, "ctr": 0.0, "watch_s_per_request": 0.0}
    assert _run(["rollout", "promote", *t]) == 0
    out = _last_json(capsys)
    assert (out["state"], out["primary_release_id"], out["canary_release_id"]) == ("promoted", "rel-b", "")
    assert _run(["rollout", "abort", *t]) == 2
    assert "FAILED_PRECONDITION: cannot abort" in capsys.readouterr().err


def test_a_wrong_token_is_refused_by_the_server(fake_target, capsys):
    assert _run(["rollout", "status", "--target", fake_target, "--token", "nope"]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


# -- end to end against the real server ----------------------------------------------------------
def _server_has_rollouts() -> bool:
    from server.admin import AdminServicer

    return "SetRollout" in AdminServicer.__dict__ and "GetRollout" in AdminServicer.__dict__


@pytest.mark.skipif(not _server_has_rollouts(), reason="needs server.admin.AdminServicer.SetRollout/GetRollout (the lead wires them)")
def test_rollout_end_to_end_against_a_real_server(request, capsys):
    """A canary at 100 % answers every user with arm "canary"; promote makes it the primary;
    a second rollout is aborted and everyone is back on the primary."""
    from server.app import BackgroundServer
    from server.config import ServerConfig

    release = request.getfixturevalue("release_dir")
    data = request.getfixturevalue("small_sim")
    cfg = ServerConfig(release=release, data_dir=data, host="127.0.0.1", port=0, metrics_port=None, admin_token=TOKEN)
    with BackgroundServer(cfg) as srv:
        target = f"127.0.0.1:{srv.port}"
        t = ["--target", target, "--token", TOKEN]
        assert _run(["rollout", "set", *t, "--canary", str(release), "--canary-percent", "100", "--salt", "e2e"]) == 0
        assert _last_json(capsys)["state"] == "canary"
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.RecommenderStub(ch)
            arms = {stub.Recommend(pb.RecommendRequest(user_id=str(u), k=5), timeout=10).arm for u in range(1, 21)}
        assert arms == {"canary"}
        assert _run(["rollout", "status", *t]) == 0
        status = _last_json(capsys)
        assert {a["arm"] for a in status["arms"]} >= {"primary", "canary"}
        assert _run(["rollout", "promote", *t]) == 0
        assert _last_json(capsys)["state"] == "promoted"
        assert _run(["rollout", "set", *t, "--canary", str(release), "--canary-percent", "50", "--salt", "e2e-2"]) == 0
        capsys.readouterr()
        assert _run(["rollout", "abort", *t]) == 0
        assert _last_json(capsys)["state"] == "aborted"
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.RecommenderStub(ch)
            assert {stub.Recommend(pb.RecommendRequest(user_id=str(u), k=5), timeout=10).arm for u in range(1, 21)} == {"primary"}
