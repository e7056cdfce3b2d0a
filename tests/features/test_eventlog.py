"""The event log: round trips, day partitioning, filters, append-only writes, crash safety
and the erasure path (delete_user) with its audit trail."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.eventlog import DeletionReport, EventLog, day_of, day_start_ts
from features.events import EVENT_SCHEMA, MS_PER_DAY, MS_PER_HOUR, EventBatch, EventType

T0 = 1_767_571_200_000  # 2026-01-05T00:00:00Z


def make_batch(n: int = 500, days: int = 3, seed: int = 0, first_id: int = 1, users: int = 20) -> EventBatch:
    rng = np.random.default_rng(seed)
    return EventBatch(
        event_id=np.arange(first_id, first_id + n, dtype=np.int64),
        ts=T0 + rng.integers(0, days * MS_PER_DAY, n),
        user_id=rng.integers(1, users + 1, n),
        item_id=rng.integers(1, 50, n),
        creator_id=rng.integers(1, 10, n),
        topic=rng.integers(0, 5, n).astype(np.int32),
        session_id=rng.integers(1, 100, n),
        type=rng.integers(0, 4, n).astype(np.int8),
        value=rng.random(n) * 100,
    )


def as_sorted_table(b: EventBatch) -> pa.Table:
    return b.sorted().to_arrow()


def part_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("day=*/part-*.parquet"))}


def test_empty_and_missing_log(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "nope")
    assert len(log.read()) == 0
    assert log.read_table().schema == EVENT_SCHEMA
    assert log.days() == [] and log.count() == 0 and log.max_ts() is None
    with pytest.raises(ValueError, match="does not exist"):
        log.read(must_exist=True)
    (tmp_path / "events").mkdir()
    with pytest.raises(ValueError, match="not an event log.*did you mean"):
        EventLog(tmp_path).read(must_exist=True)
    assert log.append(EventBatch.empty()) == 0


def test_round_trip_sorted_and_partitioned_by_utc_day(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    b = make_batch()
    assert log.append(b) == len(b)
    got = log.read()
    assert got.to_arrow().equals(as_sorted_table(b))
    assert np.all(np.diff(got.ts) >= 0)
    assert log.days() == ["2026-01-05", "2026-01-06", "2026-01-07"]
    assert sorted(p.name for p in tmp_path.glob("day=*")) == ["day=2026-01-05", "day=2026-01-06", "day=2026-01-07"]
    for day_dir in tmp_path.glob("day=*"):
        lo = day_start_ts(day_dir.name.removeprefix("day="))
        for part in day_dir.glob("part-*.parquet"):
            t = pq.read_table(part)
            assert t.schema.equals(EVENT_SCHEMA, check_metadata=False)
            ts = t.column("ts").to_numpy()
            assert ts.min() >= lo and ts.max() < lo + MS_PER_DAY
    assert log.count() == len(b)
    assert log.max_ts() == int(b.ts.max())


def test_midnight_boundaries() -> None:
    assert day_of(T0) == "2026-01-05"
    assert day_of(T0 - 1) == "2026-01-04"
    assert day_of(T0 + MS_PER_DAY - 1) == "2026-01-05"
    assert day_start_ts("2026-01-05") == T0


def test_ties_broken_by_event_id(tmp_path: Path) -> None:
    rows = [dict(event_id=i, ts=T0 + 5, user_id=1, item_id=1, type="play", value=1.0) for i in (9, 3, 7)]
    log = EventLog(tmp_path)
    log.append(EventBatch.from_rows(rows))
    assert log.read().event_id.tolist() == [3, 7, 9]


def test_filters(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    b = make_batch(n=2000)
    log.append(b)
    lo, hi = T0 + MS_PER_DAY + 3 * MS_PER_HOUR, T0 + 2 * MS_PER_DAY + 5 * MS_PER_HOUR
    got = log.read(start_ts=lo, end_ts=hi, user_ids=[3, 5], types=[EventType.PLAY, "like"])
    m = (b.ts >= lo) & (b.ts < hi) & np.isin(b.user_id, [3, 5]) & np.isin(b.type, [1, 2])
    assert got.to_arrow().equals(as_sorted_table(b.take(np.flatnonzero(m))))
    assert len(got) > 0
    # each bound alone, and the large-id-list path
    assert len(log.read(start_ts=lo)) == int((b.ts >= lo).sum())
    assert len(log.read(end_ts=hi)) == int((b.ts < hi).sum())
    many = np.arange(0, 5000)
    assert len(log.read(user_ids=many)) == len(b)
    assert len(log.read(user_ids=[])) == 0 and len(log.read(types=[])) == 0
    assert len(log.read(start_ts=hi, end_ts=lo)) == 0
    t = log.read_table(columns=["user_id", "value"], types=["skip"])
    assert t.column_names == ["user_id", "value"] and t.num_rows == int((b.type == 3).sum())
    with pytest.raises(ValueError, match="unknown event columns"):
        log.read_table(columns=["nope"])
    with pytest.raises(ValueError, match="unknown event type"):
        log.read(types=["watch"])


def test_append_only_and_duplicates_kept(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    b1 = make_batch(seed=1)
    log.append(b1)
    before = part_files(tmp_path)
    b2 = make_batch(seed=2, first_id=10_000)
    log.append(b2)
    after = part_files(tmp_path)
    assert set(before) < set(after)
    assert all(after[k] == v for k, v in before.items())  # existing files untouched
    assert len(after) == len(before) + 3
    log.append(b1)  # an at-least-once redelivery: kept, consumers dedupe
    assert log.count() == 2 * len(b1) + len(b2)
    got = log.read()
    assert len(np.unique(got.event_id)) == len(b1) + len(b2)


def test_temp_and_foreign_files_are_invisible(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    b = make_batch()
    log.append(b)
    day_dir = tmp_path / "day=2026-01-05"
    (day_dir / ".part-deadbeef.0123.tmp").write_bytes(b"PAR1 half a file")  # a crashed writer's leftovers
    (day_dir / "notes.txt").write_text("not data")
    (tmp_path / "day=2026-01-20").mkdir()  # an empty partition
    assert log.read().to_arrow().equals(as_sorted_table(b))
    assert log.count() == len(b)
    assert log.days() == ["2026-01-05", "2026-01-06", "2026-01-07"]


def test_crash_during_append_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = EventLog(tmp_path)
    b = make_batch()
    log.append(b)
    before = part_files(tmp_path)

    def boom(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        log.append(make_batch(seed=3, first_id=50_000))
    monkeypatch.undo()
    assert part_files(tmp_path) == before
    assert not list(tmp_path.glob("day=*/*.tmp"))  # the temp file was cleaned up
    assert log.read().to_arrow().equals(as_sorted_table(b))


def _audit_lines(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "_audit" / "deletions.jsonl").read_text().splitlines()]


def test_delete_user(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    # user 7 only on day 2; everyone else spread over three days
    b = make_batch(n=900, users=6)
    b7 = EventBatch.from_rows(
        [dict(event_id=100_000 + i, ts=T0 + MS_PER_DAY + 1000 * i, user_id=7, item_id=1, type="play", value=3.0) for i in range(5)]
    )
    log.append(b)
    log.append(b7)
    before = part_files(tmp_path)

    report = log.delete_user(7, reason="user request #42", actor="test")
    assert report == DeletionReport(partitions_rewritten=["2026-01-06"], rows_removed=5)
    after = part_files(tmp_path)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed and all(k.startswith("day=2026-01-06/") for k in changed)  # other days untouched
    assert log.read().to_arrow().equals(as_sorted_table(b))  # everyone else intact, in order
    assert not list(tmp_path.glob("day=*/*.tmp"))

    # a user spread over all days
    report3 = log.delete_user(3, reason="erasure")
    assert report3.rows_removed == int((b.user_id == 3).sum()) > 0
    assert report3.partitions_rewritten == ["2026-01-05", "2026-01-06", "2026-01-07"]
    assert len(log.read(user_ids=[3])) == 0
    keep = np.flatnonzero(b.user_id != 3)
    assert log.read().to_arrow().equals(as_sorted_table(b.take(keep)))

    again = log.delete_user(7, reason="repeat request", actor="test")
    assert again == DeletionReport(partitions_rewritten=[], rows_removed=0)

    lines = _audit_lines(tmp_path)
    assert [x["user_id"] for x in lines] == [7, 3, 7]
    assert lines[0]["reason"] == "user request #42" and lines[0]["actor"] == "test"
    assert lines[0]["partitions_rewritten"] == ["2026-01-06"] and lines[0]["rows_removed"] == 5
    assert lines[2]["rows_removed"] == 0
    assert set(lines[0]) == {"time", "user_id", "reason", "actor", "partitions_rewritten", "rows_removed"}
    assert log.audit_records() == lines


def test_delete_user_empty_part_removed_and_no_pii_in_audit(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    solo = EventBatch.from_rows([dict(event_id=1, ts=T0 + 10, user_id=11, item_id=1, type="like", value=1.0)])
    log.append(solo)
    log.append(make_batch(n=50, days=1, users=5))
    r = log.delete_user(11, reason="gdpr")
    assert r.rows_removed == 1
    assert len(list((tmp_path / "day=2026-01-05").glob("part-*.parquet"))) == 1
    text = (tmp_path / "_audit" / "deletions.jsonl").read_text()
    assert "zip" not in text and "85711" not in text
    with pytest.raises(ValueError, match="reason"):
        log.delete_user(11, reason=" ")


def test_large_log_reads_fast(tmp_path: Path) -> None:
    import time

    log = EventLog(tmp_path)
    n = 1_000_000
    log.append(make_batch(n=n, days=10, users=10_000))
    t = time.perf_counter()
    got = log.read()
    assert len(got) == n
    assert time.perf_counter() - t < 5.0
    t = time.perf_counter()
    one = log.read(user_ids=[42], start_ts=T0 + 2 * MS_PER_DAY)
    assert time.perf_counter() - t < 2.0
    assert np.all(one.user_id == 42)


def test_deduplicated_is_computed_once_per_batch_and_keeps_the_first_occurrence():
    import pickle

    from features.events import EventBatch

    n = 6
    cols = {f: np.zeros(n, dtype=getattr(EventBatch.empty(), f).dtype) for f in ("user_id", "item_id", "creator_id", "topic", "session_id", "type", "value")}
    b = EventBatch(**cols, event_id=np.array([5, 3, 5, 7, 3, 9], dtype=np.int64), ts=np.arange(n, dtype=np.int64) * 10)
    d = b.deduplicated()
    assert d.event_id.tolist() == [5, 3, 7, 9] and d.ts.tolist() == [0, 10, 30, 50]  # first occurrences, log order
    assert b.deduplicated() is d and d.deduplicated() is d  # remembered, and a deduplicated batch is its own
    e = pickle.loads(pickle.dumps(d))  # as shipped to a Ray worker
    assert e.deduplicated() is e and e.event_id.tolist() == d.event_id.tolist()
    u = d.take(np.array([0, 0, 1]))  # a take may repeat rows: not known to be unique, computed again
    assert u.deduplicated().event_id.tolist() == [5, 3]
