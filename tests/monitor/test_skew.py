"""Live parity: rows the server's own request path produced (the exact matrix its ranker was
handed) match the batch path as of the request time, set by set; a corruption of one feature
set's served values is found in that set and nowhere else; bad input exits 2 naming the option."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from features.catalog import ItemCatalog
from features.datasets import load_info, read_items
from features.eventlog import EventLog
from features.repo import feature_sets
from monitor.served_log import ServedRecord, read_served_log
from monitor.skew import check_skew, feature_group
from parity.cli import main
from server import pipeline
from server.bootstrap import build_service
from server.config import ServerConfig
from server.pipeline import SOURCES, Timer
from server.served_log import ServedLogWriter


@pytest.fixture(scope="module")
def service(release_dir, small_sim):
    svc = build_service(ServerConfig(release=release_dir, data_dir=small_sim, host="127.0.0.1", port=0, metrics_port=None,
                                     admin_token="test-admin-token", cpu_threads=2, io_threads=4))
    yield svc
    svc.cpu.shutdown()
    svc.io.shutdown()


def _served(service, user: int, k: int, request_id: str) -> ServedRecord:
    """One Recommend through the server's pure request path, logged as the lead's writer will:
    the top k and a few sampled candidates, with the matrix the ranker was actually given."""
    snap = service.state.current
    now = service.clock.now_ms()
    uf = snap.plan.decode(user, snap.plan.read_records(service.store, user, now), now)
    seen: list[np.ndarray] = []
    score = snap.runtime.score
    snap.runtime.score = lambda X, *a, **kw: (seen.append(np.array(X, copy=True)), score(X, *a, **kw))[1]
    try:
        ranked, top = pipeline.recommend(snap, uf, np.empty(0, np.int64), k, now, service.cfg, Timer())
    finally:
        del snap.runtime.score  # the instance attribute goes; the method is back
    (X,) = seen
    rest = np.setdiff1d(np.arange(len(ranked.ids)), top)[:3]
    idx = np.concatenate([top, rest]).astype(np.int64)
    pos = np.concatenate([np.arange(len(top)), np.full(len(rest), -1)]).astype(np.int32)
    return ServedRecord(request_id, now, user, snap.release_id, "primary", "Recommend", "ok", None, 1.0, len(ranked.ids),
                        ranked.ids[idx], pos, ranked.scores[idx], [SOURCES[s] for s in ranked.source[idx].tolist()],
                        np.concatenate([np.zeros(len(top), bool), np.ones(len(rest), bool)]), X[idx], tuple(snap.runtime.inputs.columns))


@pytest.fixture(scope="module")
def honest(service, small_sim):
    ev = EventLog(small_sim / "events").read()
    users = np.bincount(ev.user_id).argsort()[-4:].tolist() + [int(ev.user_id.max()) + 1000]  # active users and a cold one
    return [_served(service, int(u), 10, f"req-{i}") for i, u in enumerate(users)]


def _write(root, records) -> None:
    with ServedLogWriter(root) as w:
        for r in records:
            assert w.offer(r)


def _inputs(small_sim):
    info = load_info(small_sim)
    return (EventLog(small_sim / "events").read().deduplicated(), feature_sets(info.kind, info.n_topics),
            ItemCatalog.from_table(read_items(small_sim)))


def test_honest_rows_show_no_skew_in_any_feature_set(honest, small_sim, tmp_path):
    _write(tmp_path, honest)
    rep = check_skew(read_served_log(tmp_path), *_inputs(small_sim))
    cols = honest[0].columns
    assert rep.rows == sum(len(r.item_ids) for r in honest) and rep.requests == len(honest)
    assert {s.feature_set for s in rep.sets} == {feature_group(c) for c in cols if not c.startswith("retrieval.")}
    assert {"request", "item", "cross", "trend"} <= {s.feature_set for s in rep.sets}  # derived columns are checked too
    assert rep.excluded == tuple(sorted(c for c in cols if c.startswith("retrieval.")))
    assert rep.compared == rep.rows * (len(cols) - len(rep.excluded))
    assert rep.differ == 0, [e for s in rep.sets for e in s.examples]
    assert all(s.max_abs_diff == 0.0 for s in rep.sets)


@pytest.mark.parametrize("which", ["user", "item", "request"])
def test_a_corrupted_feature_set_is_found_in_that_set_only(honest, small_sim, tmp_path, which):
    cols = honest[0].columns
    groups = [feature_group(c) for c in cols]
    target = {"user": groups[0], "item": next(g for g in groups if g.startswith("item_")), "request": "request"}[which]
    j = groups.index(target)

    def corrupt(r: ServedRecord) -> ServedRecord:
        X = r.features.copy()
        X[:, j] = np.nan_to_num(X[:, j], nan=0.0) + 0.5
        return replace(r, features=X)

    _write(tmp_path, [corrupt(r) for r in honest])
    rep = check_skew(read_served_log(tmp_path), *_inputs(small_sim))
    assert rep.set(target).differ == rep.rows  # one column, every row
    assert rep.set(target).max_abs_diff == pytest.approx(0.5, abs=1e-4) or rep.set(target).missing_mismatch > 0
    assert {s.feature_set for s in rep.sets if s.differ} == {target}
    assert cols[j] in rep.set(target).examples[0]


def test_the_command_reports_per_set_and_exits_0_even_with_skew(honest, small_sim, tmp_path, capsys):
    bad = [replace(r, features=r.features + 1.0) if i == 0 else r for i, r in enumerate(honest)]
    _write(tmp_path / "log", bad)
    assert main(["monitor", "skew", "--served-log", str(tmp_path / "log"), "--events", str(small_sim)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["rows"] == sum(len(r.item_ids) for r in honest)
    assert summary["differ"] > 0 and summary["excluded"] == [c for c in sorted(honest[0].columns) if c.startswith("retrieval.")]
    assert any("SKEW in" in line for line in out)
    assert all(v["differ"] <= v["compared"] for v in summary["sets"].values())
    if summary["excluded"]:
        assert any(line.strip().startswith("not checked: retrieval.") for line in out)


def test_bad_input_exits_2_naming_the_option(honest, small_sim, tmp_path, capsys):
    assert main(["monitor", "skew", "--served-log", str(tmp_path / "nope"), "--events", str(small_sim)]) == 2
    assert "--served-log" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["monitor", "skew", "--served-log", str(tmp_path / "empty"), "--events", str(small_sim)]) == 2
    assert "--served-log" in capsys.readouterr().err
    _write(tmp_path / "log", honest[:1])
    assert main(["monitor", "skew", "--served-log", str(tmp_path / "log"), "--events", str(small_sim), "--release", "rel-nope"]) == 2
    err = capsys.readouterr().err
    assert "--release rel-nope" in err and honest[0].release_id in err
    assert main(["monitor", "skew", "--served-log", str(tmp_path / "log"), "--events", str(tmp_path / "nodata")]) == 2
    assert "--events" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["monitor", "skew", "--served-log", str(tmp_path / "log"), "--events", str(small_sim), "--until-ms", "-1"])
    assert e.value.code == 2 and "--until-ms" in capsys.readouterr().err


def test_a_release_folder_selects_its_rows(honest, small_sim, release_dir, tmp_path, capsys):
    _write(tmp_path, honest[:2])
    assert main(["monitor", "skew", "--served-log", str(tmp_path), "--events", str(small_sim), "--release", str(release_dir)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["releases"] == [honest[0].release_id]


def test_list_relative_retrieval_columns_are_left_out_and_named(honest, small_sim, tmp_path):
    # every release's ranker reads the list's rank, score gap and item-item score (models/candidates.py)
    assert {"retrieval.rank", "retrieval.gap", "retrieval.item_item"} <= set(honest[0].columns)
    _write(tmp_path, honest)
    rep = check_skew(read_served_log(tmp_path), *_inputs(small_sim))
    assert rep.excluded == ("retrieval.gap", "retrieval.item_item", "retrieval.rank")
    assert "retrieval" not in {s.feature_set for s in rep.sets} and rep.differ == 0
    assert rep.summary()["excluded_why"].startswith("list-relative")


def test_a_column_the_data_dir_does_not_define_is_refused(honest, small_sim, tmp_path):
    r = honest[0]
    _write(tmp_path, [replace(r, columns=("user_nope.x", *r.columns[1:]))])
    with pytest.raises(ValueError, match="defines no feature set 'user_nope'"):
        check_skew(read_served_log(tmp_path), *_inputs(small_sim))
