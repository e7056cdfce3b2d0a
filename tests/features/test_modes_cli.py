"""Serving modes end to end: parity holds in every mode (verify), a mode switch leaves the store
readable, the cadence runs only what is due, and the plan command reads real measurements."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.eventlog import EventLog
from features.lookup import FeatureLookup
from features.materialize import materialize, stored_watermark, switch_mode
from features.modes import ModePlan, SetMode, load_modes
from features.online.memory import MemoryStore
from features.repo import feature_sets
from features.served_values import VALUES_SUFFIX
from features.verify import verify_parity

ROOT = Path(__file__).resolve().parents[2]
SETS = feature_sets("simulated", 20)


def _parity(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("modes", ["", "user_activity=on_read:cap=4,user_creator=on_read:cap=2,item_popularity=on_read",
                                   "user_activity=materialized:1h,user_topic=materialized:15m,item_popularity=materialized:6h"])
def test_parity_holds_in_every_serving_mode(small_sim, modes):
    events = EventLog(small_sim / "events").read()
    rep = verify_parity(events, SETS, MemoryStore("v"), probes=4, seed=1, modes=ModePlan.parse(modes) if modes else None)
    assert rep.checked > 0 and rep.mismatches == 0, [e for s in rep.sets for e in s.examples]


def test_a_mode_switch_leaves_the_store_readable_with_the_same_values(small_sim):
    log = EventLog(small_sim / "events")
    store = MemoryStore("sw")
    materialize(log, store, SETS)
    fs = next(s for s in SETS if s.name == "user_activity")
    now = log.max_ts() + 1
    codes = np.arange(1, 40)
    before = FeatureLookup(store, SETS).read(fs.name, codes, now).frame.values
    assert "served-values records deleted" in switch_mode(log, store, fs, SetMode.parse("on_read:cap=8"))
    assert not [k for k in store.iter_keys(fs.name) if k.version == fs.version + VALUES_SUFFIX]
    assert np.array_equal(FeatureLookup(store, SETS).read(fs.name, codes, now).frame.values, before)  # states read as on_read bases
    assert "materialised in full" in switch_mode(log, store, fs, SetMode.parse("streaming"))
    assert np.array_equal(FeatureLookup(store, SETS).read(fs.name, codes, now).frame.values, before)
    assert load_modes(store, SETS).of(fs.name).spec == "streaming"


def test_the_cadence_one_shot_runs_only_due_materialized_sets_and_the_mode_command_names_bad_input(small_sim, redis_url):
    args = ("--events", str(small_sim), "--store", redis_url, "--namespace", "cadence-cli")
    p = _parity("features", "mode", "user_topic=materialized:15m", *args)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["user_topic"] == "materialized:15m"
    p = _parity("features", "materialize", "--due", *args)
    assert p.returncode == 0, p.stderr
    runs = [json.loads(line) for line in p.stdout.strip().splitlines()]
    assert runs[0]["ran"] == ["user_topic"]  # the only set in materialized mode
    assert json.loads(_parity("features", "materialize", "--due", *args).stdout.strip().splitlines()[-1])["ran"] == []  # not due again
    from features.online.redis_store import RedisStore

    with RedisStore(redis_url, namespace="cadence-cli") as store:
        fs = next(s for s in SETS if s.name == "user_topic")
        assert stored_watermark(store, fs) == runs[0]["until_ts"] and runs[0]["until_ts"] % (15 * 60_000) == 0
    p = _parity("features", "mode", "user_topic=hourly", *args)
    assert p.returncode != 0 and "user_topic" in p.stderr and "hourly" in p.stderr
    p = _parity("features", "mode", "nosuchset=on_read", *args)
    assert p.returncode != 0 and "nosuchset" in p.stderr


def test_the_plan_command_reads_the_log_the_measurements_and_a_backtest(small_sim, tmp_path):
    trade = {"sets": {
        "user_activity": {"streaming": {"write_s_per_event": 4e-5, "materialize_s_per_entity": 0, "read_p99_added_ms": 0, "bytes_per_entity": 2600, "read_ms_per_request": 0.01},
                          "materialized": {"write_s_per_event": 0, "materialize_s_per_entity": 5e-5, "read_p99_added_ms": 0, "bytes_per_entity": 2600, "read_ms_per_request": 0.01},
                          "on_read": {"write_s_per_event": 2e-6, "materialize_s_per_entity": 0, "read_p99_added_ms": 0.7, "bytes_per_entity": 1800, "read_ms_per_request": 0.9}},
    }}  # fmt: skip
    (tmp_path / "trade.json").write_text(json.dumps(trade))
    (tmp_path / "bt.json").write_text(json.dumps({"tolerance": {"user_activity": {"max_staleness_ms": 86_400_000, "max_missing": 0.05}}}))
    p = _parity("features", "plan", "--events", str(small_sim), "--qps", "200", "--trade", str(tmp_path / "trade.json"), "--backtest", str(tmp_path / "bt.json"))
    assert p.returncode == 0, p.stderr
    plan = {c["feature_set"]: c for c in json.loads(p.stdout.strip().splitlines()[-1])["plan"]}
    assert plan["user_activity"]["mode"] == "materialized" and plan["user_activity"]["every_ms"] == 86_400_000  # a day tolerated: a daily run is cheapest
    assert plan["item_popularity"]["mode"] == "streaming" and "no measured costs" in plan["item_popularity"]["why"]
    assert any(line.startswith("user_activity") and "materialized:1d" in line for line in p.stdout.splitlines())  # the table
    p = _parity("features", "plan", "--events", str(small_sim), "--qps", "200", "--trade", str(tmp_path / "missing.json"))
    assert p.returncode != 0 and "--trade" in p.stderr
    p = _parity("features", "plan", "--events", str(small_sim), "--qps", "-1", "--trade", str(tmp_path / "trade.json"))
    assert p.returncode != 0 and "--qps" in p.stderr
