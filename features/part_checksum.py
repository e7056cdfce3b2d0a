"""Checksums of event-log parts: a sidecar ``part-<uuid>.parquet.sha256`` beside each part.

Why: Parquet checks neither the bytes of a data page nor most of its metadata, so a flipped
bit inside a part still reads, with different values, and training or serving would use
them unnoticed. The sha256 of the whole file, recorded when the part is written and checked
whenever it is read, turns any change into one clear error (``EventLogCorrupt``).

Why a sidecar per part rather than a per-day manifest: an append writes new files and never
touches existing ones (a day manifest would be rewritten on every append, a read-modify-write
shared by every part of the day, and one bad manifest would take the whole day with it); a
part and its checksum are copied, restored from backup or quarantined together as two files
with the same stem; readers glob ``part-*.parquet``, which never matches ``*.sha256``. The
file uses ``sha256sum``'s format, so ``sha256sum -c`` can check a day by hand.

Crash safety comes from the order of two atomic renames (see features.eventlog):
- a new part: its sidecar is renamed into place first, then the part. A crash in between
  leaves a sidecar with no part, which no reader sees (``parity data check --repair``
  removes it); never a visible part without its checksum.
- a rewritten part (delete_user): the sidecar first lists BOTH the old and the new digest,
  then the part is renamed over the old one, then the sidecar is rewritten with the new
  digest alone. A crash anywhere leaves a part that matches its sidecar. A part matches if
  its digest is any one listed (two only in that window; ``--repair`` settles them to one).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from features.atomic import fsync_dir, write_atomic

__all__ = [
    "EventLogCorrupt", "PartCheck", "SIDECAR_SUFFIX", "check_part", "file_sha256", "format_sidecar",
    "parse_sidecar", "read_sidecar", "sidecar_of", "write_sidecar",
]

SIDECAR_SUFFIX = ".sha256"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class EventLogCorrupt(ValueError):
    """A part of the event log that must not be read: changed, truncated, unreadable, or
    missing its checksum. Carries the file and the reason; the message says what to do.

    A ValueError, so the command line prints it as one ``parity: error: ...`` line."""

    def __init__(self, path: str | Path, reason: str, log_root: str | Path | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.log_root = Path(log_root) if log_root is not None else self.path.parent.parent
        super().__init__(
            f"event log part {self.path} is corrupt: {reason}. Restore it (with its {SIDECAR_SUFFIX} file) from a backup, "
            f"or move it aside with `parity data check --events {self.log_root} --quarantine` (its events then leave the log)"
        )

    def __reduce__(self):  # pickles (e.g. across worker processes) with its fields, not only the message
        return (EventLogCorrupt, (self.path, self.reason, self.log_root))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (about 1 ms per MB here: cheap next to reading the part)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sidecar_of(part: Path) -> Path:
    """``part-x.parquet`` -> ``part-x.parquet.sha256``, in the same directory."""
    return part.with_name(part.name + SIDECAR_SUFFIX)


def format_sidecar(part_name: str, digests: Sequence[str]) -> str:
    """sha256sum lines, one per accepted digest (two only while a rewrite is in flight)."""
    if not digests:
        raise ValueError("a checksum file needs at least one digest")
    return "".join(f"{d}  {part_name}\n" for d in dict.fromkeys(digests))


def parse_sidecar(text: str, part_name: str) -> tuple[str, ...]:
    """The digests a sidecar accepts for ``part_name``; ValueError if it is malformed or
    names another file (a sidecar copied beside the wrong part)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"line {n} is not '<64 hex digits>  <file name>': {line[:80]!r}")
        if m.group(2) != part_name:
            raise ValueError(f"line {n} is for {m.group(2)[:80]!r}, not {part_name!r}")
        out.append(m.group(1))
    if not out:
        raise ValueError("it is empty")
    return tuple(out)


def read_sidecar(part: Path) -> tuple[str, ...] | None:
    """The digests recorded for ``part``, or None if it has no sidecar.
    Raises EventLogCorrupt if the sidecar exists but cannot be read or parsed."""
    side = sidecar_of(part)
    try:
        text = side.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise EventLogCorrupt(part, f"its checksum file {side.name} cannot be read ({exc})") from None
    try:
        return parse_sidecar(text, part.name)
    except ValueError as exc:
        raise EventLogCorrupt(part, f"its checksum file {side.name} is malformed ({exc})") from None


def write_sidecar(part: Path, digests: Sequence[str]) -> None:
    """Atomically (re)write ``part``'s sidecar and make the rename durable, so a part renamed
    into place after this call can never be seen without it."""
    text = format_sidecar(part.name, digests)
    write_atomic(sidecar_of(part), lambda f: f.write(text.encode("ascii")))
    fsync_dir(part.parent)


@dataclass(frozen=True)
class PartCheck:
    """One part's bytes against its sidecar."""

    path: Path
    digest: str  # sha256 of the part as it is now
    recorded: tuple[str, ...] | None  # what the sidecar accepts; None: the part has no sidecar
    identity: tuple[int, int, int, int]  # (device, inode, size, mtime_ns) of the file that was hashed

    def unchanged(self) -> bool:
        """True if the path still names the very file that was hashed, unmodified."""
        try:
            return _identity(os.stat(self.path)) == self.identity
        except FileNotFoundError:
            return False

    @property
    def matches(self) -> bool:
        return self.recorded is not None and self.digest in self.recorded

    @property
    def mismatch_reason(self) -> str:
        return (f"its sha256 {self.digest[:12]}... is not the one recorded in {self.path.name}{SIDECAR_SUFFIX} "
                "(the file changed after it was written: truncated, overwritten or bit-flipped)")


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def check_part(part: Path, *, attempts: int = 3) -> PartCheck | None:
    """Hash ``part`` and read its sidecar; None if the part is gone (removed since it was listed).

    Readers take no lock, so an erasure may rewrite the part (a rename: a new inode) while it
    is checked. The part is hashed through one open descriptor, the sidecar read after, and the
    path stat'ed last: a mismatch while the path still names the inode that was hashed is real
    (every legitimate writer replaces a part by rename, and its sidecar accepts the current
    part at every instant); a mismatch after a replacement is checked again.
    Raises EventLogCorrupt only if the part or its sidecar cannot be read."""
    check = None
    for _ in range(attempts):
        try:
            with open(part, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                hashed = os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EventLogCorrupt(part, f"it cannot be read ({exc.strerror or exc})") from None
        check = PartCheck(part, digest, read_sidecar(part), _identity(hashed))
        if not os.path.exists(part):
            return None
        if check.recorded is None or check.matches or check.unchanged():
            return check
    return check
