"""Writing a file so that readers see all of it or none of it."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import IO, Callable

__all__ = ["write_atomic"]


def write_atomic(path: Path, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """`write` fills a temp file beside `path`; it is fsynced, then renamed over `path`.

    A crash leaves either the old file or the new one (and at worst a dot-named temp file
    that readers ignore), never a half-written `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
