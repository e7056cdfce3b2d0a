"""`parity privacy delete-user` without a server: the data dir, the store and the served log."""
from __future__ import annotations

import json

import numpy as np
import pytest

from features.eventlog import EventLog
from monitor.erase import rows_of_user
from monitor.served_log import ServedRecord
from parity.cli import main
from server.erasure import ERASURE_AUDIT
from server.served_log import ServedLogWriter


def _served_log(root, users):
    w = ServedLogWriter(root)
    for n, u in enumerate(users):
        w.offer(ServedRecord(f"r{n}", 1, u, "rel", "primary", "Recommend", "ok", None, 1.0, 5, np.array([1, 2]), np.array([0, 1], np.int32),
                             np.array([0.5, 0.4], np.float32), ["ann", "ann"], np.array([False, True]), np.zeros((2, 2), np.float32), ("a.x", "a.y")))
    assert w.close(10.0)


def test_delete_user_erases_the_log_and_the_served_log_and_audits(sim_copy, tmp_path, capsys):
    ev = EventLog(sim_copy / "events").read()
    user = int(np.unique(ev.user_id)[0])
    served = tmp_path / "served"
    _served_log(served, [user, user + 1, user])
    assert main(["privacy", "delete-user", "--user", str(user), "--reason", "asked", "--events", str(sim_copy),
                 "--served-log", str(served)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["user_id"] == user and out["log_rows_removed"] > 0 and out["served_log_rows_removed"] == 4
    assert len(EventLog(sim_copy / "events").read(user_ids=[user])) == 0
    assert rows_of_user(served, user) == 0 and rows_of_user(served, user + 1) == 2  # only that user's rows went
    audit = [json.loads(x) for x in (sim_copy / "events" / ERASURE_AUDIT).read_text().splitlines()]
    assert audit[-1]["audit_id"] == out["audit_id"]


@pytest.mark.parametrize("argv, option", [
    (["--user", "1", "--reason", "  "], "--reason"),
    (["--user", "1", "--reason", "x"], "--events"),
    (["--user", "1", "--reason", "x", "--target", "127.0.0.1:1", "--events", "d"], "--target"),
    (["--user", "-3", "--reason", "x"], "--user"),
])
def test_bad_input_names_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) if option == "--user" else _nothing():
        assert main(["privacy", "delete-user", *argv]) == 2
    assert option in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
