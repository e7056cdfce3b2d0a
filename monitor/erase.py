"""Erasing one user from the served log and its feedback log.

Parts are immutable once finished, so a part holding the user is rewritten without their rows
(written beside it, fsynced, then renamed over it: a crash leaves the old part or the new
one, never half of each) and removed when nothing else is left in it. In-progress parts
cannot be read until finished; a writer that is running finishes its parts first
(`PartLogWriter.flush(finish_parts=True)`), and any left over are reported, not skipped
silently.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from monitor.feedback import feedback_files
from monitor.served_log import INPROGRESS, part_files

__all__ = ["LogErasure", "erase_user_from_logs", "rows_of_user"]


@dataclass(frozen=True)
class LogErasure:
    served_rows_removed: int
    feedback_rows_removed: int
    parts_rewritten: int
    parts_removed: int
    inprogress_parts: int  # parts still being written: not searchable until finished


def _rewrite(path: Path, user_id: int) -> tuple[int, bool | None]:
    """(rows removed, True: rewritten / False: removed / None: untouched). Several workers may
    erase the same user at once (server/erasure_notices.py): a part another one removed is done,
    and each writes its own temporary file before the atomic replace."""
    try:
        pf = pq.ParquetFile(path)
        t = pf.read()
    except FileNotFoundError:
        return 0, None
    hit = pc.equal(t["user_id"], pa.scalar(user_id, pa.int64()))
    n = pc.sum(hit).as_py() or 0
    if not n:
        return 0, None
    keep = t.filter(pc.invert(hit))
    if keep.num_rows == 0:
        path.unlink(missing_ok=True)
        return n, False
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.erase")
    pq.write_table(keep.replace_schema_metadata(pf.schema_arrow.metadata), tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return n, True


def erase_user_from_logs(root: str | Path, user_id: int) -> LogErasure:
    base = Path(root)
    if not base.is_dir():
        return LogErasure(0, 0, 0, 0, 0)
    counts = {"served": 0, "feedback": 0}
    rewritten = removed = 0
    for kind, files in (("served", part_files(base)), ("feedback", feedback_files(base))):
        for p in files:
            n, what = _rewrite(p, int(user_id))
            counts[kind] += n
            rewritten += what is True
            removed += what is False
    inprogress = sum(1 for _ in base.rglob(f"*{INPROGRESS}"))
    return LogErasure(counts["served"], counts["feedback"], rewritten, removed, inprogress)


def rows_of_user(root: str | Path, user_id: int) -> int:
    """How many rows of the served and feedback logs belong to the user (the erasure check)."""
    base = Path(root)
    if not base.is_dir():
        return 0
    total = 0
    for p in [*part_files(base), *feedback_files(base)]:
        t = pq.read_table(p, columns=["user_id"])
        total += pc.sum(pc.equal(t["user_id"], pa.scalar(int(user_id), pa.int64()))).as_py() or 0
    return total
