"""The simulator: determinism, schema, catalogue consistency, cold start, drift and event order."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.datasets import ITEMS_SCHEMA, events_dir, load_info, read_items, read_users
from features.eventlog import EventLog
from features.events import EVENT_SCHEMA, MS_PER_DAY, EventBatch, EventType
from features.simulator import DEFAULT_START_TS, simulate

SMALL = dict(users=300, items=120, days=7)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EventBatch]:
    out = tmp_path_factory.mktemp("sim") / "data"
    simulate(out)
    return out, EventLog(events_dir(out)).read()


def events_of(out: Path) -> pa.Table:
    return EventLog(events_dir(out)).read_table()


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a = simulate(tmp_path / "a", seed=7, **SMALL)
    b = simulate(tmp_path / "b", seed=7, **SMALL)
    c = simulate(tmp_path / "c", seed=8, **SMALL)
    assert a == b
    ea, eb, ec = events_of(tmp_path / "a"), events_of(tmp_path / "b"), events_of(tmp_path / "c")
    assert ea.num_rows > 1000
    assert ea.equals(eb)
    assert read_items(tmp_path / "a").equals(read_items(tmp_path / "b"))
    assert read_users(tmp_path / "a").equals(read_users(tmp_path / "b"))
    assert not ea.equals(ec) and a != c


def test_refuses_existing_data_dir(tmp_path: Path) -> None:
    simulate(tmp_path / "d", **SMALL)
    with pytest.raises(ValueError, match="already holds a data dir"):
        simulate(tmp_path / "d", **SMALL)
    with pytest.raises(ValueError, match="midnight"):
        simulate(tmp_path / "e", start_ts=DEFAULT_START_TS + 1)


def test_layout_schema_and_info(default_run: tuple[Path, EventBatch]) -> None:
    out, ev = default_run
    info = load_info(out)
    assert info.kind == "simulated" and info.seed == 0
    assert (info.n_users, info.n_items, info.n_topics) == (2000, 500, 20)
    assert info.n_events == len(ev) == EventLog(events_dir(out)).count()
    assert 50_000 < len(ev) < 500_000  # a useful size that still builds in well under a second or two
    assert info.start_ts == DEFAULT_START_TS and info.end_ts == DEFAULT_START_TS + 14 * MS_PER_DAY
    assert info.pii_fields == {"users": []}
    assert ev.ts.min() >= info.start_ts and ev.ts.max() < info.end_ts
    days = EventLog(events_dir(out)).days()
    assert len(days) == 14 and days[0] == "2026-01-05"
    for part in events_dir(out).glob("day=*/part-*.parquet"):
        assert pq.read_schema(part).equals(EVENT_SCHEMA, check_metadata=False)
    items = read_items(out)
    assert items.schema.equals(ITEMS_SCHEMA) and items.num_rows == 500
    assert items.column("title")[0].as_py() == "video-1"
    assert items.column("genres").to_pylist()[:3] == [[t] for t in items.column("topic").to_pylist()[:3]]
    dur = items.column("duration_s").to_numpy()
    q = items.column("quality").to_numpy()
    assert dur.min() >= 30 and dur.max() <= 3600 and 0 <= q.min() and q.max() <= 1
    users = read_users(out)
    assert users.column_names == ["user_id", "region", "signup_ts"] and users.num_rows == 2000
    # every event type appears, with the documented values
    counts = np.bincount(ev.type, minlength=5)
    assert counts[EventType.RATING] == 0 and counts[:4].min() > 0
    assert np.all(ev.value[ev.type != EventType.PLAY] == 1.0)
    assert np.all(ev.value[ev.type == EventType.PLAY] > 0)
    assert np.all(ev.session_id > 0)


def test_event_ids_unique_and_in_time_order(default_run: tuple[Path, EventBatch]) -> None:
    _, ev = default_run
    assert len(np.unique(ev.event_id)) == len(ev)
    assert ev.event_id.tolist() == list(range(1, len(ev) + 1))  # read order is (ts, event_id)


def test_topic_and_creator_match_catalogue(default_run: tuple[Path, EventBatch]) -> None:
    out, ev = default_run
    items = read_items(out)
    ids = items.column("item_id").to_numpy()
    assert ids.tolist() == list(range(1, len(ids) + 1))
    idx = ev.item_id - 1
    assert np.array_equal(ev.topic, items.column("topic").to_numpy()[idx])
    assert np.array_equal(ev.creator_id, items.column("creator_id").to_numpy()[idx])
    assert np.isin(ev.user_id, read_users(out).column("user_id").to_numpy()).all()


def test_heavy_tailed_activity(default_run: tuple[Path, EventBatch]) -> None:
    _, ev = default_run
    per_user = np.bincount(ev.user_id)[1:]
    active = per_user[per_user > 0]
    assert np.percentile(active, 99) > 5 * np.median(active)


def test_cold_start_items_published_and_shown(default_run: tuple[Path, EventBatch]) -> None:
    out, ev = default_run
    info = load_info(out)
    items = read_items(out)
    pub = items.column("publish_ts").to_numpy()
    new = pub >= info.start_ts
    assert new.sum() > 50  # new items arrive during the period ...
    new_days = np.unique((pub[new] - info.start_ts) // MS_PER_DAY)
    assert len(new_days) == 14  # ... on every day
    imp = ev.type == EventType.IMPRESSION
    shown = np.unique(ev.item_id[imp])
    assert np.isin(items.column("item_id").to_numpy()[new], shown).mean() > 0.8
    # nothing is shown, played or liked before it exists
    assert np.all(ev.ts >= pub[ev.item_id - 1])
    # new users sign up during the period and act only afterwards
    users = read_users(out)
    signup = users.column("signup_ts").to_numpy()
    assert (signup > info.start_ts).sum() > 50
    assert np.all(ev.ts >= signup[ev.user_id - 1])


def test_popularity_rises_then_decays(default_run: tuple[Path, EventBatch]) -> None:
    out, ev = default_run
    pub = read_items(out).column("publish_ts").to_numpy()
    imp = ev.type == EventType.IMPRESSION
    age_days = (ev.ts[imp] - pub[ev.item_id[imp] - 1]) // MS_PER_DAY
    start = load_info(out).start_ts
    fresh_items = pub[ev.item_id[imp] - 1] >= start  # full curve observed from publish
    per_age = np.bincount(age_days[fresh_items], minlength=10)[:10]
    n_items_at_age = np.array([((pub >= start) & (pub + a * MS_PER_DAY < start + 13 * MS_PER_DAY)).sum() for a in range(10)])
    rate = per_age / np.maximum(n_items_at_age, 1)
    assert rate[1] > rate[0] * 0.8  # no cliff right after publish (shown from the next midnight)
    assert rate[1:3].max() > 2 * rate[7:10].mean()  # and a clear decay a week later


def test_drift_in_last_days(default_run: tuple[Path, EventBatch]) -> None:
    out, ev = default_run
    info = load_info(out)
    drift_ts = info.params["drift_start_ts"]
    drift_topics = info.params["drift_topics"]
    assert drift_ts == info.end_ts - 3 * MS_PER_DAY and len(drift_topics) == 3
    play = ev.type == EventType.PLAY
    before = play & (ev.ts < drift_ts)
    after = play & (ev.ts >= drift_ts)
    share_before = np.isin(ev.topic[before], drift_topics).mean()
    share_after = np.isin(ev.topic[after], drift_topics).mean()
    assert share_after > 1.6 * share_before, (share_before, share_after)
    # a control: the same comparison between two pre-drift windows shows no such jump
    early = play & (ev.ts < info.start_ts + 4 * MS_PER_DAY)
    mid = play & (ev.ts >= info.start_ts + 7 * MS_PER_DAY) & (ev.ts < drift_ts)
    r = np.isin(ev.topic[mid], drift_topics).mean() / np.isin(ev.topic[early], drift_topics).mean()
    assert 0.6 < r < 1.4


def test_impression_precedes_play_like_skip(default_run: tuple[Path, EventBatch]) -> None:
    _, ev = default_run
    t = pa.table({"u": ev.user_id, "i": ev.item_id, "s": ev.session_id, "ty": ev.type, "ts": ev.ts})
    imp = t.filter(pa.compute.equal(t["ty"], int(EventType.IMPRESSION))).select(["u", "i", "s", "ts"])
    imp = imp.rename_columns(["u", "i", "s", "imp_ts"])
    # one impression per (user, item, session)
    assert imp.group_by(["u", "i", "s"]).aggregate([("imp_ts", "count")]).num_rows == imp.num_rows
    for ty in (EventType.PLAY, EventType.LIKE, EventType.SKIP):
        rows = t.filter(pa.compute.equal(t["ty"], int(ty)))
        j = rows.join(imp, keys=["u", "i", "s"], join_type="left outer")
        assert j.num_rows == rows.num_rows
        assert j["imp_ts"].null_count == 0, f"{ty.name} without an impression"
        assert pa.compute.all(pa.compute.greater(j["ts"], j["imp_ts"])).as_py(), f"{ty.name} not after its impression"
    # a like follows a play of the same item in the same session
    plays = t.filter(pa.compute.equal(t["ty"], int(EventType.PLAY))).select(["u", "i", "s", "ts"])
    plays = plays.rename_columns(["u", "i", "s", "play_ts"])
    likes = t.filter(pa.compute.equal(t["ty"], int(EventType.LIKE)))
    j = likes.join(plays, keys=["u", "i", "s"], join_type="left outer")
    assert j["play_ts"].null_count == 0
    assert pa.compute.all(pa.compute.greater(j["ts"], j["play_ts"])).as_py()


def test_plays_depend_on_taste_and_quality(default_run: tuple[Path, EventBatch]) -> None:
    """Higher-quality items convert impressions into plays more often (a learnable signal)."""
    out, ev = default_run
    q = read_items(out).column("quality").to_numpy()
    imp = ev.type == EventType.IMPRESSION
    play = ev.type == EventType.PLAY
    n_imp = np.bincount(ev.item_id[imp], minlength=len(q) + 1)[1:]
    n_play = np.bincount(ev.item_id[play], minlength=len(q) + 1)[1:]
    ok = n_imp >= 30
    ctr = n_play[ok] / n_imp[ok]
    assert np.corrcoef(q[ok], ctr)[0, 1] > 0.3
    # users concentrate their plays on few topics (Dirichlet tastes): a heavy user's topic mix
    # is far more concentrated (Herfindahl index) than the platform's overall mix
    u_play, t_play = ev.user_id[play], ev.topic[play]
    overall = np.bincount(t_play, minlength=20) / len(t_play)
    heavy = np.flatnonzero(np.bincount(u_play) >= 40)
    assert len(heavy) > 50
    per_user = [np.sum((np.bincount(t_play[u_play == u], minlength=20) / np.sum(u_play == u)) ** 2) for u in heavy]
    assert np.median(per_user) > 1.6 * np.sum(overall**2)
