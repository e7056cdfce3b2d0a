"""Writing a file so that readers see all of it or none of it."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import IO, Callable

__all__ = ["write_atomic", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Make the directory entries of `path` durable (a rename is durable only once its
    directory is); best effort where the platform cannot fsync a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(
    path: Path,
    write: Callable[[IO], None],
    *,
    binary: bool = True,
    before_commit: Callable[[Path], None] | None = None,
) -> None:
    """`write` fills a temp file beside `path`; it is fsynced, then renamed over `path`.

    A crash leaves either the old file or the new one (and at worst a dot-named temp file
    that readers ignore), never a half-written `path`.

    `before_commit(temp_path)` runs after the fsync and before the rename: it sees the exact
    bytes that will become `path`, so a caller can record something about them (the event
    log writes the part's checksum there) that is durable before the file is visible. If it
    raises, nothing is renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_commit is not None:
            before_commit(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
