"""The `parity` command as a user runs it: real subprocesses, real exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def parity(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "parity", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"parity {' '.join(args)} failed ({p.returncode}): {p.stderr}")
    return p


def test_simulate_is_deterministic_and_verify_proves_parity(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    parity("data", "simulate", "--out", str(a), "--users", "120", "--items", "40", "--days", "3", "--seed", "5", check=True)
    parity("data", "simulate", "--out", str(b), "--users", "120", "--items", "40", "--days", "3", "--seed", "5", check=True)
    from features.eventlog import EventLog

    assert EventLog(a / "events").read_table().equals(EventLog(b / "events").read_table())
    p = parity("features", "verify", "--events", str(a), "--probes", "6", check=True)
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["mismatches"] == 0 and last["checked"] > 10_000
    assert set(last) == {"checked", "mismatches", "max_abs_diff"}


def test_verify_proves_parity_on_movielens(movielens_dir, tmp_path):
    out = tmp_path / "ml"
    parity("data", "import-movielens", str(movielens_dir), "--out", str(out), check=True)
    p = parity("features", "verify", "--events", str(out), "--probes", "5", check=True)
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["mismatches"] == 0 and last["checked"] > 100_000


def test_verify_fails_when_nothing_can_be_checked(tmp_path):
    import shutil

    from features.simulator import simulate

    d = tmp_path / "d"
    simulate(d, users=5, items=5, days=1, seed=0)
    shutil.rmtree(d / "events")
    (d / "events").mkdir()
    p = parity("features", "verify", "--events", str(d))
    assert p.returncode != 0 and "events" in p.stderr


def test_materialize_read_lineage_and_delete_user_from_the_command_line(sim_copy, redis_url):
    ev = str(sim_copy)
    m = parity("features", "materialize", "--events", ev, "--store", redis_url, check=True)
    assert "user_activity" in m.stdout and "full" in m.stdout
    again = parity("features", "materialize", "--events", ev, "--store", redis_url, check=True)
    assert "0 entities written" in again.stdout
    r = parity("features", "read", "--events", ev, "--store", redis_url, "--set", "user_activity", "--id", "3", "--now", "1767830400000", check=True)
    got = json.loads(r.stdout)
    assert got["found"] and got["feature_ts"] > 0 and got["staleness_ms"] >= 0 and "plays_7d" in got["values"]
    lin = json.loads(parity("features", "lineage", "user_topic", "--events", ev, "--store", redis_url, check=True).stdout)
    assert lin["entity"]["keys"] == ["user_id", "topic"] and lin["version"].startswith("v")
    assert lin["materialized_until_ts"] > 0 and {s["name"] for s in lin["sources"]} == {"plays", "engaged"}
    fr = json.loads(parity("features", "freshness", "--events", ev, "--store", redis_url, "--now", "1768000000000", check=True).stdout.strip().splitlines()[-1])
    assert {r["feature_set"] for r in fr} == {"user_activity", "item_popularity", "user_topic", "user_creator"}
    assert all(r["entities"] > 0 and 0 <= r["staleness_p50_ms"] <= r["staleness_max_ms"] for r in fr)
    d = parity("features", "delete-user", "--events", ev, "--user", "3", "--reason", "test", "--store", redis_url, check=True)
    assert json.loads(d.stdout)["log_rows_removed"] > 0
    r = parity("features", "read", "--events", ev, "--store", redis_url, "--set", "user_activity", "--id", "3", check=True)
    assert json.loads(r.stdout)["found"] is False


@pytest.mark.parametrize(
    "args, needle",
    [
        (["data", "simulate", "--out", "x", "--users", "0"], "--users must be > 0"),
        (["data", "simulate", "--out", "x", "--days", "two"], "--days must be an integer"),
        (["features", "verify", "--events", "/nonexistent/dir"], "--events /nonexistent/dir: no such directory"),
        (["features", "verify"], "--events"),
        (["features", "read", "--events", "{sim}", "--store", "memory", "--set", "nope", "--id", "1"], "unknown feature set 'nope'"),
        (["features", "read", "--events", "{sim}", "--store", "memory", "--set", "user_topic", "--id", "1"], "bad user_topic id '1'"),
        (["features", "read", "--events", "{sim}", "--store", "mysql://x", "--set", "user_activity", "--id", "1"], "mysql"),
        (["features", "read", "--events", "{sim}", "--store", "redis://127.0.0.1:1/0", "--set", "user_activity", "--id", "1"], "127.0.0.1:1"),
    ],
)
def test_bad_input_gets_a_one_line_error_naming_the_field(args, needle, small_sim):
    p = parity(*[a.replace("{sim}", str(small_sim)) for a in args])
    assert p.returncode == 2
    assert needle in p.stderr
    assert "Traceback" not in p.stderr


def test_every_subcommand_has_useful_help():
    for cmd in (["data", "simulate"], ["data", "import-movielens"], ["features", "verify"], ["features", "stream"],
                ["features", "materialize"], ["features", "lineage"], ["features", "delete-user"], ["features", "retire"]):
        p = parity(*cmd, "--help", check=True)
        assert "usage: parity" in p.stdout and len(p.stdout.splitlines()) > 4


def test_verify_exits_1_and_prints_the_json_line_when_values_disagree(small_sim, monkeypatch, capsys):
    import features.verify as verify
    from parity.cli import main

    def broken(events, sets, store, **kw):
        rep = verify.SetReport("user_activity", "v1", 3, checked=10, mismatches=2, max_abs_diff=0.5, examples=["x differs"])
        return verify.VerifyReport(10, 2, 0.5, 1, len(events), [rep])

    monkeypatch.setattr(verify, "verify_parity", broken)
    assert main(["features", "verify", "--events", str(small_sim), "--probes", "1"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == {"checked": 10, "mismatches": 2, "max_abs_diff": 0.5}
    assert any("mismatch: x differs" in line for line in out)


def _flip_a_bit_mid_part(data_dir: Path) -> Path:
    part = sorted((data_dir / "events").glob("day=*/part-*.parquet"))[1]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    return part


def test_a_corrupt_log_part_stops_verify_train_and_check_with_one_line_naming_it(sim_copy, tmp_path):
    part = _flip_a_bit_mid_part(sim_copy)
    for args in (["features", "verify", "--events", str(sim_copy), "--probes", "2"],
                 ["train", "--events", str(sim_copy), "--out", str(tmp_path / "rel"), "--profile", "tiny"],
                 ["features", "materialize", "--events", str(sim_copy)]):
        p = parity(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.startswith(f"parity: error: event log part {part} is corrupt") and "sha256" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    c = parity("data", "check", "--events", str(sim_copy))
    assert c.returncode == 1 and c.stdout.startswith(f"CORRUPT {part.relative_to(sim_copy / 'events')}:")
    assert json.loads(c.stdout.splitlines()[-1])["corrupt"] == 1
    q = parity("data", "check", "--events", str(sim_copy), "--quarantine")
    assert q.returncode == 0 and "moved to _quarantine/" in q.stdout
    parity("features", "verify", "--events", str(sim_copy), "--probes", "2", check=True)  # reads again, without that part


def test_parity_serve_refuses_a_corrupt_log_part_with_one_line(sim_copy, release_dir):
    part = _flip_a_bit_mid_part(sim_copy)
    # a server that does not notice would start and serve: the timeout turns that into a failure
    p = subprocess.run([sys.executable, "-m", "parity", "serve", "--release", str(release_dir), "--events", str(sim_copy),
                        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"parity serve: error: event log part {part} is corrupt"), p.stderr
