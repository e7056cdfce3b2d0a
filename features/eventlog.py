"""The event log: an append-only Parquet store of EVENT_SCHEMA rows, partitioned by UTC day.

Layout: ``ROOT/day=YYYY-MM-DD/part-<uuid>.parquet``. Every append writes new part files and
never touches existing ones, so readers need no locks and a half-finished append is
invisible: a part is written under a temp name (``.part-*.tmp``, which no reader globs),
fsynced, then renamed into place.

Every part has a checksum: ``part-<uuid>.parquet.sha256`` beside it (sha256 of the file's
bytes), durable before the part becomes visible; see features.part_checksum for why a sidecar
and the order of renames that keeps it consistent through a crash. Every read hashes the
parts it opens (about 2 ms for the 2.4 MB, 184k-event demo log, against ~60 ms to read it,
so there is no cache to go stale) and raises ``EventLogCorrupt`` naming the file on a
mismatch or an unreadable part. A read whose parts an erasure renamed over meanwhile runs
again (``_read_verified``), so what it returns comes from the bytes it verified. A log this
code created holds ``ROOT/_format.json``: there a part without a sidecar is an error too. A log written before checksums existed has no such
file and reads as before; ``parity data check --repair`` adds the missing checksums (see
features.logcheck) and then marks it.

Duplicates are kept: sources deliver at least once, and deciding which copy wins is the
consumers' job (they dedupe on event_id). The log's only other mutation is
delete_user, the erasure path, which rewrites exactly the part files holding that user's
rows (each by an atomic rename over the old file) and records what it did in
``ROOT/_audit/deletions.jsonl``.

Reads go through DuckDB's ``read_parquet(..., hive_partitioning=true)``: day partitions are
pruned before any file is opened, and the ts/user/type filters are pushed into the Parquet
scan (row-group statistics), so reading a slice of a multi-million-event log is fast.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.atomic import fsync_dir, write_atomic
from features.events import EVENT_SCHEMA, MS_PER_DAY, EventBatch, EventType
from features.part_checksum import EventLogCorrupt, PartCheck, check_part, file_sha256, sidecar_of, write_sidecar

__all__ = ["EventLog", "EventLogCorrupt", "EventLogBusy", "DeletionReport", "day_of", "day_start_ts", "FORMAT_FILE"]

_DAY_DIR = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")
_PART_GLOB = "part-*.parquet"
_AUDIT_DIR = "_audit"
_AUDIT_FILE = "deletions.jsonl"
_LOCK_FILE = "_writer.lock"
# Present in a log whose every part has a checksum (created by this code, or repaired).
FORMAT_FILE = "_format.json"
_FORMAT = {"part_checksums": "sha256", "sidecar": "part-<uuid>.parquet.sha256"}
# A read that a writer keeps overlapping is tried again for this long (see _read_verified):
# an erasure rewrites a day's part in tens of milliseconds, a whole log in seconds.
_READ_PATIENCE_S = 10.0
_READ_BACKOFF_S = (0.01, 0.25)  # first and longest pause between attempts
_T = TypeVar("_T")
# Above this many ids a user filter is joined from a registered table instead of an IN list.
_MAX_INLINE_IDS = 2000
_EPOCH = dt.date(1970, 1, 1)


def day_of(ts_ms: int) -> str:
    """The UTC day (``YYYY-MM-DD``) holding a ms timestamp: the partition an event goes to."""
    return (_EPOCH + dt.timedelta(days=int(ts_ms) // MS_PER_DAY)).isoformat()


def day_start_ts(day: str) -> int:
    """ms since epoch of 00:00 UTC on ``day`` (``YYYY-MM-DD``)."""
    return (dt.date.fromisoformat(day) - _EPOCH).days * MS_PER_DAY


class EventLogBusy(TimeoutError):
    """Writers rewrote the log under every attempt to read it for a while; try again later.
    (An OSError, so the command line prints it as one line.)"""


@dataclass(frozen=True)
class DeletionReport:
    """What delete_user changed: the day partitions rewritten and how many rows went."""

    partitions_rewritten: list[str]
    rows_removed: int


def _write_part(table: pa.Table, final: Path, *, replacing: str | None = None) -> None:
    """Write ``table`` as the part ``final`` together with its checksum.

    The sidecar is durable before the part is renamed into place. ``replacing`` is the digest
    of the part being rewritten in place (delete_user): the sidecar accepts it and the new
    digest until the rename has landed, then the new one alone, so at no instant does the
    part on disk fail its check (features.part_checksum)."""
    new: list[str] = []

    def record(tmp: Path) -> None:
        new.append(file_sha256(tmp))
        write_sidecar(final, [replacing, new[0]] if replacing else new)

    write_atomic(final, lambda f: pq.write_table(table, f, compression="zstd", row_group_size=256 * 1024), before_commit=record)
    fsync_dir(final.parent)
    if replacing and replacing != new[0]:
        write_sidecar(final, new)


def _max_ts(paths: list[Path]) -> int | None:
    if not paths:
        return None
    con = duckdb.connect()
    try:
        ((v,),) = con.sql(f"SELECT max(ts) FROM read_parquet({_sql_paths(paths)})").fetchall()
    finally:
        con.close()
    return v


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _sql_paths(paths: Iterable[str | Path]) -> str:
    """A DuckDB list literal of file paths, quoted safely."""
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _type_codes(types: Iterable[EventType | int | str]) -> list[int]:
    out = []
    for t in types:
        if isinstance(t, str):
            out.append(int(EventType.parse(t)))
        else:
            out.append(int(EventType(int(t))))
    return sorted(set(out))


class EventLog:
    """An append-only, day-partitioned Parquet event log rooted at ``root``.

    The root need not exist until the first append; reading a missing or empty log yields an
    empty result unless ``must_exist=True`` (the CLI's choice, where an empty result from a
    mistyped path would be silently wrong).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"EventLog({str(self.root)!r})"

    # ------------------------------------------------------------------ layout

    def _day_dirs(self) -> list[tuple[str, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _DAY_DIR.match(p.name)
            if m and p.is_dir():
                out.append((m.group(1), p))
        out.sort()
        return out

    def _parts(self, day_dir: Path) -> list[Path]:
        return sorted(day_dir.glob(_PART_GLOB))

    def day_dirs(self) -> list[Path]:
        """The day partition folders, ascending (features.logcheck looks inside them)."""
        return [d for _, d in self._day_dirs()]

    def parts(self) -> list[tuple[str, Path]]:
        """(day, part file) for every part in the log, unchecked (features.logcheck checks them)."""
        return self._files()

    @property
    def requires_checksums(self) -> bool:
        """True if every part must have a checksum sidecar (the log holds FORMAT_FILE)."""
        return (self.root / FORMAT_FILE).is_file()

    def mark_checksummed(self) -> None:
        """Record that every part of this log has a checksum (from now on, one without is an error)."""
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_FORMAT, sort_keys=True) + "\n"
        write_atomic(self.root / FORMAT_FILE, lambda f: f.write(text.encode("utf-8")))
        fsync_dir(self.root)

    def _verify(self, paths: Iterable[Path]) -> dict[Path, PartCheck]:
        """Hash every part about to be opened; raise EventLogCorrupt on the first bad one.
        Returns the checks of the parts still there (an erasure may remove an emptied one)."""
        strict = self.requires_checksums
        out = {}
        for p in paths:
            c = check_part(p)
            if c is None:
                continue
            if c.recorded is None:
                if strict:
                    raise EventLogCorrupt(
                        p, f"it has no checksum file {sidecar_of(p).name}, though this log keeps one for every part (deleted "
                        "or lost?). If you trust the part as it is, `parity data check --repair` records its current checksum",
                        self.root)
            elif not c.matches:
                raise EventLogCorrupt(p, c.mismatch_reason, self.root)
            out[p] = c
        return out

    def _read_verified(self, paths: list[Path], read: Callable[[list[Path]], _T]) -> _T:
        """``read(parts)`` on ``paths`` once they are verified, with the guarantee that its
        result comes from the verified bytes.

        Readers take no lock, and DuckDB opens a file more than once (footer, then pages), so
        a part an erasure renames over mid-read can give a Thrift error, or a mix of two
        versions. The parts are stat'ed again after the read; if any was replaced or removed
        meanwhile, the read runs again (verification included). A read error with every
        part unchanged is blamed on the part that does not parse (an old, unchecked log)."""
        deadline = time.monotonic() + _READ_PATIENCE_S
        pause, attempts = _READ_BACKOFF_S[0], 0
        while True:
            attempts += 1
            checks = self._verify(paths)
            try:
                result, error = read(list(checks)), None
            except (duckdb.Error, OSError, pa.ArrowException) as exc:
                result, error = None, exc
            if all(c.unchanged() for c in checks.values()):
                if error is not None:
                    raise self._blame(list(checks), error) from None
                return result
            if time.monotonic() + pause > deadline:
                raise EventLogBusy(
                    f"event log {self.root} was rewritten during each of {attempts} attempts to read it over "
                    f"{_READ_PATIENCE_S:.0f} s (an erasure or a repair is running); try again when it has finished")
            time.sleep(pause)
            pause = min(2 * pause, _READ_BACKOFF_S[1])

    def _blame(self, paths: Sequence[Path], exc: BaseException) -> BaseException:
        """The part that made a multi-file read fail, as EventLogCorrupt; else ``exc`` itself.

        Only parts without a checksum (an old log) can get here: a part that matches its
        checksum is the file that was written."""
        for p in paths:
            try:
                pq.read_table(p)
            except FileNotFoundError:
                continue  # removed since it was listed (an erasure emptied it): not a corrupt part
            except (OSError, pa.ArrowException) as bad:
                return EventLogCorrupt(p, f"it is not readable Parquet ({_first_line(bad)})", self.root)
        return exc

    def _files(self, start_ts: int | None = None, end_ts: int | None = None) -> list[tuple[str, Path]]:
        """(day, part file) for every part in the days overlapping [start_ts, end_ts)."""
        lo = day_of(start_ts) if start_ts is not None else None
        hi = day_of(end_ts - 1) if end_ts is not None else None
        out = []
        for day, d in self._day_dirs():
            if (lo is not None and day < lo) or (hi is not None and day > hi):
                continue
            out.extend((day, p) for p in self._parts(d))
        return out

    def exists(self) -> bool:
        """True if the root holds at least one day partition."""
        return bool(self._day_dirs())

    def _check_exists(self) -> None:
        if not self.root.exists():
            raise ValueError(f"event log {self.root} does not exist")
        if not self.root.is_dir():
            raise ValueError(f"event log {self.root} is not a directory")
        if not self.exists():
            hint = ""
            if (self.root / "events").is_dir():
                hint = f"; did you mean {self.root / 'events'}?"
            raise ValueError(f"{self.root} is not an event log (no day=YYYY-MM-DD partitions){hint}")

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Serialise writers (append, delete_user, repairs) across processes; readers never lock."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / _LOCK_FILE, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ writing

    def append(self, batch: EventBatch) -> int:
        """Write ``batch`` as one new part file per UTC day it touches; returns rows written.

        Rows are sorted by (ts, event_id) inside each part so row-group statistics prune well.
        """
        if not isinstance(batch, EventBatch):
            raise TypeError(f"append takes an EventBatch, got {type(batch).__name__}")
        n = len(batch)
        if n == 0:
            return 0
        batch = batch.sorted()
        day_idx = batch.ts // MS_PER_DAY
        bounds = np.flatnonzero(np.diff(day_idx)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [n]])
        table = batch.to_arrow()
        with self.writer_lock():
            if not self.requires_checksums and not self._files():
                self.mark_checksummed()  # a new log: every part it will ever hold has a checksum
            for s, e in zip(starts.tolist(), ends.tolist()):
                day = day_of(int(batch.ts[s]))
                d = self.root / f"day={day}"
                d.mkdir(parents=True, exist_ok=True)
                _write_part(table.slice(s, e - s), d / f"part-{uuid.uuid4().hex}.parquet")
        return n

    def delete_user(self, user_id: int, reason: str, actor: str = "cli") -> DeletionReport:
        """Erase every event of ``user_id``; audit the erasure. Idempotent.

        Only part files containing the user are rewritten, each atomically (temp file, fsync,
        rename over the original), so a crash leaves every file either old or new, never
        partial, and re-running finishes the job. A part left empty is removed. The audit
        line holds the user id, reason, actor, partitions and row count, nothing else.

        Every part is verified first: a corrupt one stops the erasure before anything changes
        (rewriting it would give damaged rows a fresh, valid checksum).
        """
        user_id = int(user_id)
        if not reason or not reason.strip():
            raise ValueError("delete_user needs a reason (it is recorded in the audit log)")
        rewritten: list[str] = []
        removed = 0
        with self.writer_lock():
            files = self._files()
            checks = self._verify(p for _, p in files)
            hits: dict[str, int] = {}
            if files:
                con = duckdb.connect()
                try:
                    paths = [str(p) for _, p in files]
                    rows = con.sql(
                        f"SELECT filename, count(*) FROM read_parquet({_sql_paths(paths)}, filename=true) "
                        f"WHERE user_id = {user_id} GROUP BY filename"
                    ).fetchall()
                except duckdb.Error as exc:
                    raise self._blame([p for _, p in files], exc) from None
                finally:
                    con.close()
                hits = {str(f): int(c) for f, c in rows}
            for day, path in files:
                if str(path) not in hits:
                    continue
                table = pq.read_table(path, schema=EVENT_SCHEMA)
                keep = pc.not_equal(table.column("user_id"), pa.scalar(user_id, pa.int64()))
                kept = table.filter(keep)
                removed += table.num_rows - kept.num_rows
                if kept.num_rows:
                    _write_part(kept, path, replacing=checks[path].digest)
                else:
                    path.unlink()  # the part first: a sidecar without its part is invisible and harmless
                    sidecar_of(path).unlink(missing_ok=True)
                    fsync_dir(path.parent)
                if day not in rewritten:
                    rewritten.append(day)
            self._audit(
                {
                    "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                    "user_id": user_id,
                    "reason": reason,
                    "actor": actor,
                    "partitions_rewritten": rewritten,
                    "rows_removed": removed,
                }
            )
        return DeletionReport(partitions_rewritten=rewritten, rows_removed=removed)

    def _audit(self, record: dict) -> None:
        d = self.root / _AUDIT_DIR
        d.mkdir(parents=True, exist_ok=True)
        with open(d / _AUDIT_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def audit_records(self) -> list[dict]:
        """The deletion audit trail, oldest first."""
        p = self.root / _AUDIT_DIR / _AUDIT_FILE
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

    # ------------------------------------------------------------------ reading

    def read_table(
        self,
        start_ts: int | None = None,
        end_ts: int | None = None,
        user_ids: Sequence[int] | np.ndarray | None = None,
        types: Iterable[EventType | int | str] | None = None,
        columns: Sequence[str] | None = None,
        *,
        must_exist: bool = False,
    ) -> pa.Table:
        """Events with ``start_ts <= ts < end_ts`` (either bound optional), optionally only
        for ``user_ids`` and ``types``, as an Arrow table sorted by (ts, event_id).

        ``columns`` selects a subset of EVENT_SCHEMA (default: all), in the order given.
        """
        if must_exist:
            self._check_exists()
        if columns is None:
            cols = [f.name for f in EVENT_SCHEMA]
        else:
            cols = list(columns)
            unknown = [c for c in cols if c not in EVENT_SCHEMA.names]
            if unknown:
                raise ValueError(f"unknown event columns {unknown}; allowed: {EVENT_SCHEMA.names}")
        schema = pa.schema([EVENT_SCHEMA.field(c) for c in cols])
        if start_ts is not None and end_ts is not None and end_ts <= start_ts:
            return schema.empty_table()
        files = self._files(start_ts, end_ts)
        if not files:
            return schema.empty_table()

        where = []
        if start_ts is not None:
            where.append(f"ts >= {int(start_ts)}")
        if end_ts is not None:
            where.append(f"ts < {int(end_ts)}")
        if types is not None:
            codes = _type_codes(types)
            if not codes:
                return schema.empty_table()
            where.append(f"type IN ({', '.join(map(str, codes))})")
        ids = None
        if user_ids is not None:
            ids = np.unique(np.asarray(user_ids, dtype=np.int64))
            if len(ids) == 0:
                return schema.empty_table()
            if len(ids) <= _MAX_INLINE_IDS:
                where.append(f"user_id IN ({', '.join(map(str, ids.tolist()))})")
            else:
                where.append(f"user_id BETWEEN {int(ids[0])} AND {int(ids[-1])}")
                where.append("user_id IN (SELECT uid FROM _wanted_users)")
        select = ", ".join(f'"{c}"' for c in cols)

        def scan(paths: list[Path]) -> pa.Table:
            if not paths:
                return schema.empty_table()
            con = duckdb.connect()
            try:
                if ids is not None and len(ids) > _MAX_INLINE_IDS:
                    con.register("_wanted_users", pa.table({"uid": ids}))
                sql = (
                    f"SELECT {select} FROM read_parquet({_sql_paths(paths)}, hive_partitioning=true)"
                    + (f" WHERE {' AND '.join(where)}" if where else "")
                    + " ORDER BY ts, event_id"
                )
                return con.sql(sql).to_arrow_table()
            finally:
                con.close()

        return self._read_verified([p for _, p in files], scan).cast(schema)

    def read(
        self,
        start_ts: int | None = None,
        end_ts: int | None = None,
        user_ids: Sequence[int] | np.ndarray | None = None,
        types: Iterable[EventType | int | str] | None = None,
        *,
        must_exist: bool = False,
    ) -> EventBatch:
        """As read_table (all columns), as an EventBatch sorted by (ts, event_id)."""
        table = self.read_table(start_ts, end_ts, user_ids, types, must_exist=must_exist)
        if table.num_rows == 0:
            return EventBatch.empty()
        return EventBatch.from_arrow(table)

    # ------------------------------------------------------------------ summaries

    def days(self) -> list[str]:
        """The UTC days (``YYYY-MM-DD``) that hold at least one part file, ascending."""
        return [day for day, d in self._day_dirs() if self._parts(d)]

    def count(self) -> int:
        """Rows in the log (duplicates included), from Parquet footers (after the parts' checksums)."""
        return self._read_verified([p for _, p in self._files()], lambda paths: sum(pq.ParquetFile(p).metadata.num_rows for p in paths))

    def max_ts(self) -> int | None:
        """The latest event time in the log, or None if empty. Only the last day is read."""
        for day in reversed(self.days()):
            v = self._read_verified(self._parts(self.root / f"day={day}"), _max_ts)
            if v is not None:
                return int(v)
        return None
