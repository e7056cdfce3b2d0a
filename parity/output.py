"""Where a `parity` subcommand writes, checked before it starts and named when the filesystem refuses.

A subcommand that writes declares its outputs (``set_defaults(outputs=lambda args: [...])``).
`parity`'s main() then
- checks each before any work (`preflight`), so a two-minute `parity train` into a
  read-only folder fails at once, not at the end;
- turns an OSError raised while the command runs into one line
  ``parity: error: cannot write PATH: REASON`` (exit 1) when it is about an output
  (`cannot_write`): its file name lies inside one, or it came from the OS with no file name
  at all (a full disk, or pyarrow, which names no file), which in a writing command is
  the write failing.

The preflight creates nothing (an output folder the command would refuse as "already
exists" must stay untouched) and is only a first look: os.access cannot see every refusal
(as root it passes on /sys, where mkdir then fails with EPERM), which is why the runtime
mapping exists too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

__all__ = ["Output", "CannotWrite", "preflight", "cannot_write"]


@dataclass(frozen=True)
class Output:
    """A path a subcommand writes: a folder it fills, or a single file."""

    path: Path
    kind: Literal["dir", "file"] = "dir"

    @staticmethod
    def of(path: str | os.PathLike[str], kind: Literal["dir", "file"] = "dir") -> "Output":
        return Output(Path(os.path.abspath(path)), kind)


class CannotWrite(Exception):
    """The filesystem refuses an output. Printed as one line; exit code 1."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot write {self.path}: {reason}")


def _nearest_existing(path: Path) -> Path:
    q = path
    while not os.path.lexists(q) and q != q.parent:
        q = q.parent
    return q


def preflight(out: Output) -> None:
    """Raise CannotWrite if ``out`` clearly cannot be written. Creates nothing."""
    p = out.path
    if p.is_dir():
        if out.kind == "file":
            raise CannotWrite(p, "it is a directory")
        base = p
    elif os.path.lexists(p):
        if out.kind == "dir":
            return  # the command decides (simulate: "exists and is not a directory", a domain error)
        base = p
    else:
        base = _nearest_existing(p.parent)
        if not base.is_dir():
            raise CannotWrite(p, f"{base} is not a directory")
    if not os.access(base, os.W_OK | (os.X_OK if base.is_dir() else 0)):
        raise CannotWrite(p, f"{base} is not writable (permission denied or a read-only file system)")


def _inside(name: str | bytes | int | None, outputs: Iterable[Output]) -> bool:
    if not isinstance(name, str):
        return False
    a = Path(os.path.abspath(name))
    return any(a == o.path or o.path in a.parents for o in outputs)


def cannot_write(exc: OSError, outputs: list[Output]) -> CannotWrite | None:
    """``exc`` as a CannotWrite of one of ``outputs``, or None if it is about something else
    (a file the command reads, or a message our own code raised without an errno)."""
    if exc.errno is None or not outputs:
        return None  # e.g. FileNotFoundError("--events x: no such directory"): a domain error, exit 2
    reason = exc.strerror or str(exc)
    for name in (exc.filename, exc.filename2):
        if _inside(name, outputs):
            return CannotWrite(name, reason)
    if exc.filename is None and exc.filename2 is None:
        return CannotWrite(outputs[0].path, reason)
    return None
