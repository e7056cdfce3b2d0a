"""The served log through a real server: what it answered is what it logged, the logged
features equal the batch path's (the live parity check), and feedback joins its request."""
from __future__ import annotations

import numpy as np
import pytest

from features.catalog import ItemCatalog
from features.datasets import load_info, read_items
from features.eventlog import EventLog
from features.repo import feature_sets
from monitor.feedback import join_feedback, read_feedback, served_rows
from monitor.served_log import read_served_log
from monitor.skew import check_skew
from server.app import BackgroundServer
from server.client import LiveEvent, ParityClient


@pytest.fixture(scope="module")
def logged(release_dir, small_sim, tmp_path_factory, server_config, admin_token):
    root = tmp_path_factory.mktemp("served")
    cfg = server_config(release_dir, small_sim, served_log=root, log_sample=1.0)
    answers = {}
    with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=10.0, admin_token=admin_token) as c:
        for u in (3, 11, 25, 40, 10_000_000):  # the last one is unknown: a cold user
            r = c.recommend(u, k=5, request_id=f"req-{u}")
            answers[r.request_id] = r
        rk = c.rank(11, [1, 2, 3], request_id="rank-11")
        now = s.service.clock.now_ms()
        top = answers["req-3"].items[0].item_id
        fb = c.ingest([LiveEvent(9_000_001, now + 1, 3, top, "impression", 1.0, request_id="req-3"),
                       LiveEvent(9_000_002, now + 2, 3, top, "play", 12.0, request_id="req-3")])
        assert fb.accepted == 2
    return root, answers, rk


def test_every_answer_is_logged_as_it_was_returned(logged):
    root, answers, rk = logged
    batches = read_served_log(root)
    assert len(batches) == 1
    b = batches[0]
    t = b.table.to_pydict()
    assert set(t["request_id"]) == set(answers) | {"rank-11"}
    for rid, r in answers.items():
        rows = [i for i, x in enumerate(t["request_id"]) if x == rid and t["position"][i] >= 0]
        rows.sort(key=lambda i: t["position"][i])
        assert [str(t["item_id"][i]) for i in rows] == [it.item_id for it in r.items]
        np.testing.assert_allclose([t["score"][i] for i in rows], [it.score for it in r.items], rtol=1e-6)
        assert {t["release_id"][i] for i in rows} == {r.release_id} and {t["arm"][i] for i in rows} == {"primary"}
        sampled = [i for i, x in enumerate(t["request_id"]) if x == rid and t["sampled"][i]]
        assert 0 < len(sampled) <= 8  # drawn uniformly from the candidate list, for drift
        assert all(t["n_candidates"][i] > 5 for i in rows)
    X = b.feature_matrix()
    assert X.shape == (b.table.num_rows, len(b.columns)) and np.isfinite(X).any(axis=1).all()
    assert [str(t["item_id"][i]) for i, x in enumerate(t["request_id"]) if x == "rank-11"] == [it.item_id for it in rk.items]


def test_the_logged_features_equal_the_batch_path(logged, small_sim):
    root, _, _ = logged
    info = load_info(small_sim)
    rep = check_skew(read_served_log(root), EventLog(small_sim / "events").read(), feature_sets(info.kind, info.n_topics),
                     ItemCatalog.from_table(read_items(small_sim)))
    assert rep.rows > 0 and rep.compared > 0
    assert rep.differ == 0, [e for s in rep.sets for e in s.examples]


def test_feedback_joins_the_request_that_served_the_item(logged):
    root, _, _ = logged
    j = join_feedback(served_rows(read_served_log(root)), read_feedback(root))
    req = j.requests.to_pydict()
    i = req["request_id"].index("req-3")
    assert req["impressions"][i] == 1 and req["plays"][i] == 1 and req["watch_s"][i] == pytest.approx(12.0)
    others = [k for k, r in enumerate(req["request_id"]) if r != "req-3"]
    assert all(req["plays"][k] == 0 for k in others)
