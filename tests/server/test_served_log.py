"""The served log's writer: the request path never waits on it, parts are rotated by age and
size and finished on close, a part being written is invisible to readers, and what was
offered is what is read back. Plus the sampling rule, Event.request_id validation and the
ingest path's feedback hand-off."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from features.catalog import ItemCatalog
from features.datasets import load_info, read_items
from features.events import EventBatch
from features.online.memory import MemoryStore
from features.repo import feature_sets
from monitor.feedback import read_feedback
from monitor.served_log import (
    INPROGRESS,
    ServedRecord,
    part_files,
    read_served_log,
    records_to_table,
)
from parity_api.v1 import recommender_pb2 as pb
from server.clock import Clock
from server.ingest import LiveIngest
from server.served_log import FeedbackLogWriter, ServedLogWriter, recover, should_log
from server.validation import parse_events

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
COLS_A = ("user_activity.plays_1h", "item_popularity.plays_1h", "request.item_age_h")
COLS_B = ("user_ratings.count", "item_ratings.mean")


def _record(i: int, *, release: str = "rel-a", cols: tuple[str, ...] = COLS_A, n: int = 4, status: str = "ok",
            ts: int | None = None, features: bool = True) -> ServedRecord:
    rng = np.random.default_rng(i)
    X = rng.normal(size=(n, len(cols))).astype(np.float32)
    if n:
        X[0, -1] = np.nan  # a missing value survives the trip
    return ServedRecord(
        request_id=f"req-{i}", ts_ms=T0 + i if ts is None else ts, user_id=100 + i, release_id=release, arm="primary",
        method="Recommend", status=status, degraded_reason="store_timeout" if status == "degraded" else None,
        latency_ms=1.5 + i, n_candidates=300 + i, item_ids=np.arange(n, dtype=np.int64) + 10 * i,
        positions=np.asarray([*range(n - 1), -1][:n], dtype=np.int32), scores=rng.random(n).astype(np.float32),
        sources=["ann"] * (n - 1) + ["popular"] if n else [], sampled=np.asarray([False] * (n - 1) + [True] if n else [], dtype=bool),
        features=X if features else None, columns=cols)


def _inprogress(root: Path) -> list[Path]:
    return sorted(root.rglob("*" + INPROGRESS))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_offered_records_read_back_exactly_grouped_by_release(tmp_path):
    recs = [_record(0), _record(1, status="degraded"), _record(2, release="rel/b:2", cols=COLS_B),
            _record(3, n=0, status="error:UNAVAILABLE", features=False), _record(4, features=False)]
    w = ServedLogWriter(tmp_path)
    assert all(w.offer(r) for r in recs)
    assert w.close()
    assert _inprogress(tmp_path) == []
    batches = {b.release_id: b for b in read_served_log(tmp_path)}
    assert set(batches) == {"rel-a", "rel/b:2"}  # the exact id, though its folder name had to be made safe
    for rid, cols in (("rel-a", COLS_A), ("rel/b:2", COLS_B)):
        mine = [r for r in recs if r.release_id == rid]
        want = records_to_table(mine)
        got = batches[rid]
        assert got.columns == cols
        assert got.table.drop_columns(["features"]).equals(want.drop_columns(["features"]))
        expect = np.concatenate([r.features if r.features is not None else np.full((max(len(r.item_ids), 1), len(cols)), np.nan, np.float32)
                                 for r in mine])
        np.testing.assert_array_equal(got.feature_matrix(), expect)  # NaN == NaN, bit for bit otherwise
    assert all(p.parent.parent.name == "dt=2026-01-01" for p in part_files(tmp_path))
    assert w.stats().written_records == 5 and w.stats().dropped == 0


def test_offer_never_blocks_a_full_queue_drops_and_counts(tmp_path):
    entered, release = threading.Event(), threading.Event()
    dropped: list[int] = []

    def stall(n: int) -> None:  # the writer thread stops here after its first batch
        entered.set()
        release.wait()

    w = ServedLogWriter(tmp_path, queue_max=20, batch_records=1, on_written=stall, on_drop=dropped.append)
    assert w.offer(_record(0))
    assert entered.wait(30), "the writer thread never wrote its first record"
    results: list[bool] = []
    t = threading.Thread(target=lambda: results.extend(w.offer(_record(i)) for i in range(1, 31)))
    t.start()
    t.join(30)
    alive = t.is_alive()
    release.set()
    assert not alive, "offer blocked on a full queue"
    assert results == [True] * 20 + [False] * 10
    assert sum(dropped) == 10 and w.stats().dropped == 10
    assert w.close()
    assert sum(b.table.num_rows for b in read_served_log(tmp_path)) == 21 * 4  # everything queued was written


def test_parts_rotate_by_age_and_are_invisible_to_readers_until_finished(tmp_path):
    clock = _Clock()
    w = ServedLogWriter(tmp_path, rotate_s=300, clock=clock)
    w.offer(_record(0))
    assert w.flush()
    assert len(_inprogress(tmp_path)) == 1
    assert part_files(tmp_path) == [] and read_served_log(tmp_path) == []  # a part being written is skipped
    clock.now = 299.0
    w.offer(_record(1))
    assert w.flush()
    assert part_files(tmp_path) == []
    clock.now = 300.0
    assert w.flush()
    assert len(part_files(tmp_path)) == 1 and _inprogress(tmp_path) == []
    assert read_served_log(tmp_path)[0].table.column("request_id").unique().to_pylist() == ["req-0", "req-1"]
    w.offer(_record(2))
    assert w.close()
    assert len(part_files(tmp_path)) == 2 and w.stats().parts_finished == 2


def test_parts_rotate_by_size(tmp_path):
    w = ServedLogWriter(tmp_path, rotate_bytes=1)  # every row group fills a part
    for i in range(3):
        w.offer(_record(i))
        assert w.flush()
        assert len(part_files(tmp_path)) == i + 1 and _inprogress(tmp_path) == []
    w.close()
    big = ServedLogWriter(tmp_path / "big", rotate_bytes=1 << 30)
    for i in range(3):
        big.offer(_record(i))
        assert big.flush()
    assert part_files(tmp_path / "big") == []
    big.close()
    assert len(part_files(tmp_path / "big")) == 1
    assert pq.ParquetFile(part_files(tmp_path / "big")[0]).metadata.num_row_groups == 3  # one row group per batch


def test_a_new_day_and_a_new_release_open_their_own_parts(tmp_path):
    w = ServedLogWriter(tmp_path)
    for r in (_record(0), _record(1, ts=T0 + 86_400_000), _record(2, release="rel-c", cols=COLS_B)):
        w.offer(r)
    w.close()
    names = sorted(p.relative_to(tmp_path).parent.as_posix() for p in part_files(tmp_path))
    assert names == ["dt=2026-01-01/rel-a", "dt=2026-01-01/rel-c", "dt=2026-01-02/rel-a"]


def test_recover_finishes_readable_leftovers_and_leaves_cut_off_and_live_ones(tmp_path):
    w = ServedLogWriter(tmp_path, recover_on_start=False)
    w.offer(_record(0))
    w.close()
    (done,) = part_files(tmp_path)
    folder = done.parent
    data = done.read_bytes()
    closed = folder / f"part-{T0}-{os.getpid()}-901.parquet{INPROGRESS}"  # closed, then the process died before the rename
    closed.write_bytes(data)
    cut = folder / f"part-{T0}-{os.getpid()}-902.parquet{INPROGRESS}"  # died mid-write: no footer
    cut.write_bytes(data[: len(data) // 2])
    live = folder / f"part-{T0}-{os.getppid()}-903.parquet{INPROGRESS}"  # another running process is writing it
    live.write_bytes(data)
    rep = recover(tmp_path)
    assert rep.finished == (closed.with_name(closed.name[: -len(INPROGRESS)]),)
    assert rep.unreadable == (cut,) and rep.live == (live,)
    assert sum(b.table.num_rows for b in read_served_log(tmp_path)) == 8  # the part and the recovered one; the cut one skipped
    assert cut.exists() and live.exists()


def test_a_writer_recovers_leftovers_before_writing(tmp_path):
    w = ServedLogWriter(tmp_path)
    w.offer(_record(0))
    w.close()
    (p,) = part_files(tmp_path)
    p.rename(p.with_name(p.name + INPROGRESS))
    w2 = ServedLogWriter(tmp_path)
    assert w2.flush()
    w2.close()
    assert w2.recovered is not None and len(w2.recovered.finished) == 1
    assert part_files(tmp_path) == [p]


def test_sampling_keeps_every_error_and_degraded_answer_and_samples_the_rest_by_request_id():
    ids = [f"r{i}" for i in range(20_000)]
    assert all(should_log(r, 0.0, "degraded") and should_log(r, 0.0, "error:INTERNAL") for r in ids[:100])
    assert not any(should_log(r, 0.0, "ok") for r in ids[:100])
    assert all(should_log(r, 1.0, "ok") for r in ids[:100])
    kept = [r for r in ids if should_log(r, 0.1, "ok")]
    assert 0.09 < len(kept) / len(ids) < 0.11
    assert kept == [r for r in ids if should_log(r, 0.1, "ok")]  # deterministic: the same ids every time
    assert set(kept) <= {r for r in ids if should_log(r, 0.5, "ok")}  # a higher rate keeps a superset


def _ev(i: int, *, type_: str = "play", value: float = 30.0, request_id: str = "", ts: int = T0, user: int = 1, item: int = 2) -> pb.Event:
    return pb.Event(event_id=str(i), ts_ms=ts, user_id=str(user), item_id=str(item), type=type_, value=value, request_id=request_id)


def test_event_request_ids_are_checked_and_kept_per_valid_event(server_config, small_sim):
    cfg = server_config(small_sim, small_sim)
    events = [_ev(1, request_id="req-1"), _ev(2, request_id="x" * 129), _ev(3), _ev(4, request_id="bad\nid"),
              _ev(5, type_="nope", request_id="req-5"), _ev(6, request_id="y" * 128)]
    p = parse_events(events, T0 + 1000, cfg)
    assert p.batch.event_id.tolist() == [1, 3, 6]
    assert p.request_ids == ("req-1", None, "y" * 128)
    assert p.invalid == 3
    assert [(r.index, r.field) for r in p.rejected] == [(1, "request_id"), (3, "request_id"), (4, "type")]
    assert p.first_error.startswith("event 1 (event_id '2'): request_id: is 129 characters long")
    assert "request_id: must be printable" in p.rejected[1].reason


def test_ingest_hands_committed_feedback_with_request_ids_to_the_feedback_log(server_config, small_sim, tmp_path):
    info = load_info(small_sim)
    cat = ItemCatalog.from_table(read_items(small_sim))
    cfg = server_config(small_sim, small_sim)
    item = int(cat.item_id[0])
    state = SimpleNamespace(current=SimpleNamespace(items=SimpleNamespace(catalog=cat)))
    fb = FeedbackLogWriter(tmp_path)
    live = LiveIngest(cfg, info=info, sets=feature_sets(info.kind, info.n_topics), write_store=MemoryStore("t-fb"), state=state,
                      clock=Clock("wall"), metrics=None, invalidate=None, on_feedback=fb.on_feedback)
    try:
        now = T0 + 3_600_000
        chunk = [_ev(1, type_="impression", value=1, request_id="req-9", item=item), _ev(2, value=30.0, item=item, ts=T0 + 1),
                 _ev(3, type_="play", value=-5, item=item), _ev(4, type_="like", value=1, item=item, ts=T0 - 86_400_000)]
        out, _ = live._ingest_chunk(chunk, now, 0)
        assert (out.accepted, out.late, out.invalid) == (2, 1, 1)  # a late like is still feedback on what was shown
        live._ingest_chunk(chunk, now, 0)  # a resend: duplicates reach the log again, readers keep one
    finally:
        live.close()
    assert fb.close()
    t = read_feedback(tmp_path)
    assert t.column("event_id").to_pylist() == [4, 1, 2]  # in event-time order, once each
    assert t.column("request_id").to_pylist() == [None, "req-9", None]
    assert t.column("type").to_pylist() == ["like", "impression", "play"]
    assert t.column("value").to_pylist() == [1.0, 1.0, 30.0]
    assert sorted(p.parent.name for p in (tmp_path / "feedback").rglob("part-*.parquet")) == ["dt=2025-12-31", "dt=2026-01-01"]
    assert part_files(tmp_path) == []  # the served-log readers do not see the feedback log


def test_the_feedback_log_keeps_only_feedback_events(tmp_path):
    fb = FeedbackLogWriter(tmp_path)
    ev = EventBatch.from_rows([dict(event_id=i, ts=T0 + i, user_id=1, item_id=2, type=t, value=v)
                               for i, (t, v) in enumerate([("rating", 4.0), ("rating", 5.0), ("skip", 1.0)])])
    from monitor.feedback import feedback_mask

    rids = (None, "req-1", None)
    keep = feedback_mask(ev, rids)
    assert keep.tolist() == [False, True, True]  # a rating is feedback on a list only when it names the request
    fb.on_feedback(ev.take(np.flatnonzero(keep)), tuple(r for r, k in zip(rids, keep, strict=True) if k))
    fb.close()
    assert read_feedback(tmp_path).column("event_id").to_pylist() == [1, 2]


def test_writer_options_are_checked_where_given(tmp_path):
    with pytest.raises(ValueError, match="queue_max must be >= 1, got 0"):
        ServedLogWriter(tmp_path, queue_max=0)
    with pytest.raises(TypeError, match="rotate_bytes"):
        ServedLogWriter(tmp_path, rotate_bytes="big")
    with pytest.raises(ValueError, match="rotate_s must be > 0"):
        ServedLogWriter(tmp_path, rotate_s=0)


def test_a_failed_write_loses_its_records_counts_them_and_the_log_goes_on(tmp_path):
    (tmp_path / "dt=2026-01-01").write_text("a file where the day's folder should be")  # every write to that day fails
    dropped: list[int] = []
    w = ServedLogWriter(tmp_path, on_drop=dropped.append)
    assert w.offer(_record(0)) and w.offer(_record(1))
    assert w.flush()
    w.offer(_record(2, ts=T0 + 86_400_000))
    assert w.close()
    st = w.stats()
    assert (st.dropped, st.written_records, st.write_errors) == (2, 1, 1) and sum(dropped) == 2
    assert [b.table.column("request_id").unique().to_pylist() for b in read_served_log(tmp_path)] == [["req-2"]]
