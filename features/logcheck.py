"""Checking every part of an event log against its checksum, and the repairs an operator asks for.

Readers (features.eventlog) refuse a bad part but never change anything: deciding what to do
about one is a person's job, and this module (``parity data check``) is where it happens.

What a check finds, per file:
- ``corrupt``: a part whose bytes do not match its checksum, or that has none and does not
  read as an event-log Parquet file, or whose checksum file is unreadable. An error.
- ``no-checksum``: a readable part without a sidecar. An error in a log that records one for
  every part (it holds FORMAT_FILE); in a log written before checksums, a note.
- ``pending``: a sidecar listing two digests, left by a delete_user interrupted mid-rewrite.
  The part matches one of them, so it reads; a note.
- ``orphan``: a sidecar whose part is gone (an append interrupted before its rename, or a
  part removed by hand). Invisible to readers; a note.
- ``temp``: a writer's leftover temp file. Invisible to readers; a note.

``repair=True`` (under the log's writer lock, so no append or erasure runs meanwhile):
records the checksum of each readable part that has none, settles pending sidecars to the
digest the part has, removes orphans and temp files, and once every part has a checksum
marks the log (from then on a part without one is an error). It never gives a corrupt part a
new checksum. ``quarantine=True`` moves each corrupt part and its sidecar to
``ROOT/_quarantine/day=.../`` (outside the log: its events stop being read) and appends a
line to ``ROOT/_audit/quarantine.jsonl``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from features.atomic import fsync_dir
from features.eventlog import EventLog
from features.events import EVENT_SCHEMA
from features.part_checksum import SIDECAR_SUFFIX, EventLogCorrupt, check_part, sidecar_of, write_sidecar

__all__ = ["Finding", "LogCheck", "check_log", "QUARANTINE_DIR"]

QUARANTINE_DIR = "_quarantine"
_QUARANTINE_AUDIT = ("_audit", "quarantine.jsonl")
KINDS = ("corrupt", "no-checksum", "pending", "orphan", "temp")


@dataclass(frozen=True)
class Finding:
    """One file that is not simply a part matching its checksum, and what was done about it."""

    kind: str  # one of KINDS
    path: Path
    detail: str
    action: str = ""  # what a repair or quarantine did; "" if nothing


@dataclass(frozen=True)
class LogCheck:
    """The outcome of check_log."""

    root: Path
    parts: int
    verified: int  # parts whose bytes match their recorded checksum
    requires_checksums: bool  # as the log stands after any repair
    seconds: float
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def errors(self) -> tuple[Finding, ...]:
        """Findings that still make a read fail: corrupt parts left in place, and parts
        without a checksum in a log that requires them."""
        return tuple(
            f for f in self.findings
            if not f.action and (f.kind == "corrupt" or (f.kind == "no-checksum" and self.requires_checksums))
        )

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> dict:
        counts = {k: sum(f.kind == k for f in self.findings) for k in KINDS}
        return {"parts": self.parts, "verified": self.verified, "errors": len(self.errors), "requires_checksums": self.requires_checksums,
                "fixed": sum(bool(f.action) for f in self.findings), "seconds": round(self.seconds, 4), **counts}


def _parquet_problem(path: Path) -> str | None:
    """Why a part without a checksum is not a readable event-log part, or None if it is."""
    try:
        pq.read_table(path).select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        lines = str(exc).strip().splitlines()
        return f"it has no checksum and is not a readable event-log Parquet file ({(lines[0] if lines else type(exc).__name__)[:200]})"
    return None


def _quarantine(log: EventLog, part: Path, reason: str) -> str:
    dest_dir = log.root / QUARANTINE_DIR / part.parent.name
    dest_dir.mkdir(parents=True, exist_ok=True)
    side = sidecar_of(part)
    if side.exists():
        os.replace(side, dest_dir / side.name)  # the sidecar first: a part without it is an error in a checksummed log
    os.replace(part, dest_dir / part.name)
    fsync_dir(dest_dir)
    fsync_dir(part.parent)
    audit = log.root.joinpath(*_QUARANTINE_AUDIT)
    audit.parent.mkdir(parents=True, exist_ok=True)
    record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "part": str(part.relative_to(log.root)),
              "moved_to": str((dest_dir / part.name).relative_to(log.root)), "reason": reason}
    with open(audit, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return f"moved to {(dest_dir / part.name).relative_to(log.root)}"


def _check_parts(log: EventLog, repair: bool, quarantine: bool) -> tuple[list[Finding], int, int, bool]:
    """(findings, parts, verified, every remaining part has a sidecar)."""
    findings: list[Finding] = []
    verified = 0
    parts = log.parts()
    all_have_sidecar = True
    for _, part in parts:
        try:
            c = check_part(part)
        except EventLogCorrupt as exc:
            reason = exc.reason
        else:
            if c is None:  # removed since listed (only a writer does that, and repairs hold the lock)
                continue
            if c.recorded is None:
                reason = _parquet_problem(part)
                if reason is None:
                    done = ""
                    if repair:
                        write_sidecar(part, [c.digest])
                        done = "checksum recorded from the part as it is now"
                    all_have_sidecar = all_have_sidecar and bool(done)
                    findings.append(Finding("no-checksum", part, f"no {SIDECAR_SUFFIX} file beside it", done))
                    continue
            elif not c.matches:
                reason = c.mismatch_reason
            else:
                verified += 1
                if len(c.recorded) > 1:
                    done = ""
                    if repair:
                        write_sidecar(part, [c.digest])
                        done = "settled to the digest the part has"
                    findings.append(Finding("pending", part, "its checksum file lists the digests before and after an interrupted rewrite", done))
                continue
        done = _quarantine(log, part, reason) if quarantine else ""
        all_have_sidecar = all_have_sidecar and (bool(done) or sidecar_of(part).exists())
        findings.append(Finding("corrupt", part, reason, done))
    return findings, len(parts), verified, all_have_sidecar


def _check_leftovers(log: EventLog, repair: bool) -> list[Finding]:
    out = []
    for d in log.day_dirs():
        for side in sorted(d.glob(f"part-*.parquet{SIDECAR_SUFFIX}")):
            if not side.with_name(side.name[: -len(SIDECAR_SUFFIX)]).exists():
                if repair:
                    side.unlink()
                out.append(Finding("orphan", side, "a checksum file without its part (an interrupted append, or a part removed by hand)",
                                   "removed" if repair else ""))
        for tmp in sorted(d.glob(".*.tmp")):
            if repair:
                tmp.unlink()
            out.append(Finding("temp", tmp, "a writer's temp file (a writer is running, or one was interrupted)", "removed" if repair else ""))
    return out


def check_log(log: EventLog, *, repair: bool = False, quarantine: bool = False) -> LogCheck:
    """Hash every part of ``log`` and report what is wrong; optionally repair or quarantine.

    A plain check changes nothing and takes no lock (a concurrent writer's temp file may then
    show as a ``temp`` note)."""
    t = time.perf_counter()
    lock = log.writer_lock() if (repair or quarantine) else contextlib.nullcontext()
    with lock:
        findings, n_parts, verified, all_have_sidecar = _check_parts(log, repair, quarantine)
        findings += _check_leftovers(log, repair)
        if repair and all_have_sidecar and not log.requires_checksums and n_parts:
            log.mark_checksummed()
        strict = log.requires_checksums
    return LogCheck(log.root, n_parts, verified, strict, time.perf_counter() - t, tuple(findings))
