"""Writing the served log (and the feedback log beside it) off the request path.

Why this shape: the served log must cost a request almost nothing and must never make one
wait. The request path builds its `ServedRecord` (it already holds every array) and calls
`offer`, which is one non-blocking put on a bounded queue: when the queue is full the record
is dropped, counted and `offer` returns False. One background thread takes records in
batches (up to `batch_records`, or whatever arrived within `batch_wait_s`), converts each
batch to Arrow at once (`records_to_table`) and appends it to the open part as one Parquet
row group; the conversion is batched so the thread holds the GIL in a few short bursts.

Parts follow the layout of monitor/served_log.py: one open part per (day, release) (columns
differ by release; the column names and release id go into the Parquet schema metadata),
written as `part-*.parquet.inprogress` and renamed to its final name when it is rotated (by
age, `rotate_s`, or size, `rotate_bytes`) and on `close`. A process that dies mid-part leaves
only an `.inprogress` file, which readers skip; `recover` finalises the readable ones (closed
but not renamed) at start-up, which the writer does itself before its first part.

`FeedbackLogWriter` is the same machinery for ingested feedback (monitor/feedback.py), one
record per ingest chunk, in DIR/feedback/dt=YYYY-MM-DD/.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.events import EventBatch
from monitor.feedback import FEEDBACK_SCHEMA, feedback_table
from monitor.served_log import (COLUMNS_KEY, FEEDBACK_DIR, INPROGRESS, RELEASE_KEY, SCHEMA, ServedRecord, day_partition, part_name,
                                records_to_table, release_folder)

__all__ = ["ServedLogWriter", "FeedbackLogWriter", "FeedbackChunk", "PartLogWriter", "WriterStats", "RecoverReport", "recover",
           "should_log"]

log = logging.getLogger(__name__)

_DAY_MS = 86_400_000


def should_log(request_id: str, rate: float, status: str) -> bool:
    """Whether a request goes to the served log: every error and every degraded answer; the
    others when a hash of the request id falls below `rate`. The hash (not a random draw)
    makes the choice the same in every process and replica, so a request's primary and shadow
    answers, or a client's retry, are logged together or not at all."""
    if status != "ok":
        return True
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    h = int.from_bytes(hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h < rate * 18446744073709551616.0  # 2**64


@dataclass(frozen=True)
class WriterStats:
    """Counters of one writer since it started (records are what `offer` was given)."""

    offered: int
    dropped: int  # queue full, writer closed, or the write failed
    written_records: int
    written_rows: int
    parts_finished: int
    write_errors: int
    queued: int


@dataclass(frozen=True)
class RecoverReport:
    finished: tuple[Path, ...]  # readable leftovers renamed to their final name
    unreadable: tuple[Path, ...]  # cut off mid-write (no Parquet footer): left as they are, skipped by readers
    live: tuple[Path, ...]  # being written by another running process: left alone


@dataclass(frozen=True)
class _Key:
    """Where a table goes: a folder under the root and the metadata of the part's schema."""

    folder: str
    meta: tuple[tuple[bytes, bytes], ...] = ()


class _Codec:
    """What differs between logs: the record type, its conversion to Arrow, its layout."""

    schema: pa.Schema
    pattern: str  # glob of this log's in-progress parts, relative to the root

    def tables(self, records: Sequence[Any]) -> list[tuple[_Key, pa.Table, int]]:
        """(where, rows, how many of `records` they hold) per destination."""
        raise NotImplementedError


class _ServedCodec(_Codec):
    schema = SCHEMA
    pattern = "dt=*/*/part-*.parquet" + INPROGRESS

    def tables(self, records: Sequence[ServedRecord]) -> list[tuple[_Key, pa.Table, int]]:
        groups: dict[tuple[str, str, tuple[str, ...]], list[ServedRecord]] = {}
        for r in records:
            groups.setdefault((day_partition(r.ts_ms), r.release_id, tuple(r.columns)), []).append(r)
        out = []
        for (day, rid, cols), recs in groups.items():
            meta = ((COLUMNS_KEY, json.dumps(list(cols)).encode()), (RELEASE_KEY, rid.encode()))
            out.append((_Key(f"{day}/{release_folder(rid)}", meta), records_to_table(recs), len(recs)))
        return out


@dataclass(frozen=True)
class FeedbackChunk:
    """Ingested feedback: events and each one's request id ('' or None: none), parallel."""

    events: EventBatch
    request_ids: Sequence[str | None]


class _FeedbackCodec(_Codec):
    schema = FEEDBACK_SCHEMA
    pattern = "dt=*/part-*.parquet" + INPROGRESS

    def tables(self, records: Sequence[FeedbackChunk]) -> list[tuple[_Key, pa.Table, int]]:
        """One table per day; a chunk spanning two days counts once per day."""
        recs = [r for r in records if len(r.events)]
        if not recs:
            return []
        t = pa.concat_tables([feedback_table(r.events, r.request_ids) for r in recs])
        day = t.column("ts_ms").to_numpy() // _DAY_MS
        out = []
        for d in np.unique(day).tolist():
            sel = np.flatnonzero(day == d)
            n = sum(1 for r in recs if bool((r.events.ts // _DAY_MS == d).any()))
            out.append((_Key(day_partition(d * _DAY_MS)), t.take(pa.array(sel)), n))
        return out


@dataclass
class _Part:
    key: _Key
    final: Path
    tmp: Path
    sink: Any  # pa.OSFile
    writer: pq.ParquetWriter
    opened_at: float
    rows: int = 0


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)
    finish: bool = False  # also finish every open part (erasure rewrites finished parts only)


_STOP = object()


def _validate(name: str, v: Any, *, kind: type | tuple[type, ...], minimum: float, strict: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, kind):
        raise TypeError(f"{name} must be a number, got {v!r}")
    if v < minimum or (strict and v == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {v!r}")


class PartLogWriter:
    """A bounded queue and one thread that writes Parquet parts (see the module docstring).

    `on_drop(n)` is called with the number of records lost (on the caller's thread for a full
    queue, on the writer thread for a failed write); `on_written(n)` with the number of records
    written, on the writer thread. Both must be cheap and must not raise (a Prometheus
    counter's `inc` fits). `clock` times part ages (monotonic seconds; tests pass their own)."""

    def __init__(self, root: str | os.PathLike[str], codec: _Codec, *, rotate_s: float = 300.0, rotate_bytes: int = 64 << 20,
                 queue_max: int = 10_000, batch_records: int = 256, batch_wait_s: float = 1.0,
                 on_drop: Callable[[int], Any] | None = None, on_written: Callable[[int], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic, recover_on_start: bool = True, name: str = "parity-served-log") -> None:
        _validate("rotate_s", rotate_s, kind=(int, float), minimum=0, strict=True)
        _validate("rotate_bytes", rotate_bytes, kind=int, minimum=1)
        _validate("queue_max", queue_max, kind=int, minimum=1)
        _validate("batch_records", batch_records, kind=int, minimum=1)
        _validate("batch_wait_s", batch_wait_s, kind=(int, float), minimum=0, strict=True)
        for cb_name, cb in (("on_drop", on_drop), ("on_written", on_written), ("clock", clock)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{cb_name} must be callable, got {cb!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._codec = codec
        self._rotate_s, self._rotate_bytes = float(rotate_s), int(rotate_bytes)
        self._batch_records, self._batch_wait_s = int(batch_records), float(batch_wait_s)
        self._on_drop, self._on_written, self._clock = on_drop, on_written, clock
        self._q: queue.Queue = queue.Queue(maxsize=int(queue_max))
        self._parts: dict[_Key, _Part] = {}
        self._pid = os.getpid()
        self._seq = 0
        self._closed = False
        self._lock = threading.Lock()  # guards the counters touched off the writer thread
        self._offered = self._dropped = 0
        self._written_records = self._written_rows = self._finished = self._errors = 0
        self.recovered: RecoverReport | None = None
        self._recover_on_start = recover_on_start
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- the caller's side: O(1), never blocks ----------------------------------------------------

    def offer(self, record: Any) -> bool:
        """Queue a record for writing; False (and counted as dropped) when the queue is full or
        the writer is closed. Never blocks."""
        if not self._closed:
            try:
                self._q.put_nowait(record)
                self._offered += 1  # only one thread offers to a given writer (the event loop, or the ingest thread)
                return True
            except queue.Full:
                pass
        self._drop(1)
        return False

    def stats(self) -> WriterStats:
        with self._lock:
            return WriterStats(self._offered, self._dropped, self._written_records, self._written_rows, self._finished,
                               self._errors, self._q.qsize())

    def flush(self, timeout: float | None = 10.0, *, finish_parts: bool = False) -> bool:
        """Wait until everything offered before this call is written (parts stay open, unless
        `finish_parts`; parts whose age passed rotate_s are finished). True if done within
        `timeout`. Not for the request path: it waits."""
        f = _Flush(finish=finish_parts)
        try:
            self._q.put(f, timeout=timeout)
        except queue.Full:
            return False
        return f.done.wait(timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop taking records, write what is queued, finish every open part. True if the
        thread finished within `timeout` (else what it still held is left in progress)."""
        self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._q.put(_STOP, timeout=timeout)
        except queue.Full:
            return False  # the thread is stuck: it sees _closed on its next wake-up
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    def __enter__(self) -> "PartLogWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        if self._recover_on_start:
            try:
                self.recovered = _recover(self.root, self._codec.pattern)
            except OSError:
                log.exception("served log %s: recovering leftover parts failed", self.root)
        pending: list[Any] = []
        flushes: list[_Flush] = []
        stop = False
        started = time.monotonic()
        while not stop:
            wait = self._batch_wait_s - (time.monotonic() - started) if pending else self._batch_wait_s
            try:
                item = self._q.get(timeout=max(wait, 0.0001))
            except queue.Empty:
                item = None
            if item is _STOP:
                stop = True
            elif isinstance(item, _Flush):
                flushes.append(item)
            elif item is not None:
                if not pending:
                    started = time.monotonic()
                pending.append(item)
            if self._closed and not stop and item is None:
                stop = True  # close() could not queue its stop: the queue was full
            if stop:
                pending += self._drain(flushes)
            if pending and (stop or flushes or len(pending) >= self._batch_records or time.monotonic() - started >= self._batch_wait_s):
                self._write(pending)
                pending = []
            self._rotate_old()
            if any(f.finish for f in flushes):
                for key in list(self._parts):
                    self._finish(key)
            for f in flushes:
                f.done.set()
            flushes.clear()
        for key in list(self._parts):
            self._finish(key)

    def _drain(self, flushes: list[_Flush]) -> list[Any]:
        out = []
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return out
            if isinstance(item, _Flush):
                flushes.append(item)
            elif item is not _STOP:
                out.append(item)

    def _write(self, records: list[Any]) -> None:
        try:
            tables = self._codec.tables(records)
        except (ValueError, TypeError, pa.ArrowException) as exc:  # a malformed record: lose this batch, keep the log
            log.error("served log %s: %d records could not be converted and were dropped: %s", self.root, len(records), exc)
            self._count_error(len(records))
            return
        rows = done = 0
        for key, table, n in tables:
            try:
                part = self._parts.get(key) or self._open(key, table)
                part.writer.write_table(table, row_group_size=max(table.num_rows, 1))
                part.rows += table.num_rows
                rows += table.num_rows
                done += n
            except (OSError, pa.ArrowException) as exc:
                log.error("served log %s: writing %s failed (%s); its %d records are lost and the part is abandoned",
                          self.root, key.folder, exc, n)
                self._abandon(key)
                self._count_error(n)
                continue
            if part.sink.tell() >= self._rotate_bytes:
                self._finish(key)
        with self._lock:
            self._written_records += done
            self._written_rows += rows
        if done:
            self._call(self._on_written, done)

    def _open(self, key: _Key, table: pa.Table) -> _Part:
        folder = self.root / key.folder
        folder.mkdir(parents=True, exist_ok=True)
        first = int(np.min(table.column("ts_ms").to_numpy())) if table.num_rows else 0
        while True:
            self._seq += 1
            final = folder / part_name(first, self._pid, self._seq)
            tmp = final.with_name(final.name + INPROGRESS)
            if not final.exists() and not tmp.exists():
                break
        schema = self._codec.schema.with_metadata(dict(key.meta)) if key.meta else self._codec.schema
        sink = pa.OSFile(str(tmp), "wb")
        try:
            writer = pq.ParquetWriter(sink, schema)
        except BaseException:
            sink.close()
            raise
        part = _Part(key, final, tmp, sink, writer, self._clock())
        self._parts[key] = part
        return part

    def _finish(self, key: _Key) -> None:
        part = self._parts.pop(key)
        try:
            part.writer.close()
            part.sink.close()
            os.replace(part.tmp, part.final)
        except (OSError, pa.ArrowException) as exc:
            log.error("served log %s: finishing %s failed (%s); it stays in progress", self.root, part.tmp, exc)
            self._count_error(0)
            return
        with self._lock:
            self._finished += 1

    def _abandon(self, key: _Key) -> None:
        part = self._parts.pop(key, None)
        if part is None:
            return
        for closer in (part.writer.close, part.sink.close):
            try:
                closer()
            except (OSError, pa.ArrowException):
                pass

    def _rotate_old(self) -> None:
        now = self._clock()
        for key in [k for k, p in self._parts.items() if now - p.opened_at >= self._rotate_s]:
            self._finish(key)

    def _drop(self, n: int) -> None:
        with self._lock:
            self._dropped += n
        self._call(self._on_drop, n)

    def _count_error(self, lost: int) -> None:
        with self._lock:
            self._errors += 1
        if lost:
            self._drop(lost)

    @staticmethod
    def _call(cb: Callable[[int], Any] | None, n: int) -> None:
        if cb is None:
            return
        try:
            cb(n)
        except Exception:  # a metrics hook must never stop the log (logged, not raised)
            log.exception("served log: callback %r failed", cb)


class ServedLogWriter(PartLogWriter):
    """The served log (DIR/dt=.../<release>/part-*.parquet): `offer(ServedRecord) -> bool`.

    Build the record on the request path (arrays it already holds, O(k) work); decide first
    with `should_log(request_id, rate, status)`."""

    def __init__(self, root: str | os.PathLike[str], *, rotate_s: float = 300.0, rotate_bytes: int = 64 << 20, queue_max: int = 10_000,
                 on_drop: Callable[[int], Any] | None = None, on_written: Callable[[int], Any] | None = None, **options: Any) -> None:
        super().__init__(root, _ServedCodec(), rotate_s=rotate_s, rotate_bytes=rotate_bytes, queue_max=queue_max, on_drop=on_drop,
                         on_written=on_written, **options)

    def offer(self, record: ServedRecord) -> bool:
        return super().offer(record)


class FeedbackLogWriter(PartLogWriter):
    """The feedback log (DIR/feedback/dt=.../part-*.parquet): `on_feedback(events, request_ids)`
    is the ingest path's callback (server.ingest.LiveIngest); give it the served log's DIR."""

    def __init__(self, served_log_root: str | os.PathLike[str], *, rotate_s: float = 300.0, rotate_bytes: int = 64 << 20,
                 queue_max: int = 1_000, on_drop: Callable[[int], Any] | None = None, on_written: Callable[[int], Any] | None = None,
                 **options: Any) -> None:
        options.setdefault("name", "parity-feedback-log")
        super().__init__(Path(served_log_root) / FEEDBACK_DIR, _FeedbackCodec(), rotate_s=rotate_s, rotate_bytes=rotate_bytes,
                         queue_max=queue_max, on_drop=on_drop, on_written=on_written, **options)

    def on_feedback(self, events: EventBatch, request_ids: Sequence[str | None]) -> bool:
        """One ingest chunk's feedback events (never blocks; False when dropped)."""
        if len(request_ids) != len(events):
            raise ValueError(f"{len(request_ids)} request ids for {len(events)} events")
        return self.offer(FeedbackChunk(events, tuple(request_ids)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _recover(root: Path, pattern: str) -> RecoverReport:
    finished, unreadable, live = [], [], []
    for tmp in sorted(root.glob(pattern)):
        parts = tmp.name.split("-")  # part-<ts>-<pid>-<seq>.parquet.inprogress
        pid = int(parts[2]) if len(parts) >= 4 and parts[2].isdigit() else -1
        if pid != os.getpid() and pid > 0 and _pid_alive(pid):
            live.append(tmp)
            continue
        try:
            pq.read_metadata(tmp)
        except (OSError, pa.ArrowException):
            unreadable.append(tmp)
            continue
        final = tmp.with_name(tmp.name[: -len(INPROGRESS)])
        if final.exists():
            unreadable.append(tmp)  # never overwrite a finished part
            continue
        os.replace(tmp, final)
        finished.append(final)
    return RecoverReport(tuple(finished), tuple(unreadable), tuple(live))


def recover(root: str | os.PathLike[str]) -> RecoverReport:
    """Finish the readable in-progress parts a dead process left under a served-log folder
    (its feedback log included). Call at start-up, before writers open parts: a part of a
    running process (its pid alive) is left alone; one cut off mid-write stays in progress,
    skipped by readers (its rows are lost)."""
    base = Path(root)
    a = _recover(base, _ServedCodec.pattern)
    b = _recover(base / FEEDBACK_DIR, _FeedbackCodec.pattern)
    return RecoverReport(a.finished + b.finished, a.unreadable + b.unreadable, a.live + b.live)
