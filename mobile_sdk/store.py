"""The device cache: content-addressed blobs under `files/` (bundle paths, which hold their
sha256), partial downloads under `partial/`, and `state.json`, the one pointer to the bundle in
use. A new bundle becomes current only by replacing `state.json` atomically (temp file, fsync,
os.replace, fsync of the directory); blobs are never rewritten in place.

state.json: {"state_version": 1, "manifest": <manifest.json text>, "etag": str | null}
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mobile_sdk.bundle import check_path

STATE = "state.json"
_STATE_VERSION = 1


@dataclass(frozen=True)
class State:
    manifest: bytes
    etag: str | None


def _fsync_dir(path: Path) -> None:
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp name in the same directory, fsync, os.replace, fsync the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class Store:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.files = self.root / "files"
        self.partial = self.root / "partial"
        for d in (self.root, self.files, self.partial):
            d.mkdir(parents=True, exist_ok=True)

    # --- state ---------------------------------------------------------------------------
    def read_state(self) -> State | None:
        """The committed state, or None when there is none (a malformed state file counts as none)."""
        try:
            d = json.loads((self.root / STATE).read_text("utf-8"))
            if d.get("state_version") != _STATE_VERSION or not isinstance(d.get("manifest"), str):
                return None
            return State(d["manifest"].encode("utf-8"), d.get("etag") if isinstance(d.get("etag"), str) else None)
        except (OSError, ValueError, AttributeError):
            return None

    def write_state(self, state: State) -> None:
        doc = {"state_version": _STATE_VERSION, "manifest": state.manifest.decode("utf-8"), "etag": state.etag}
        write_atomic(self.root / STATE, json.dumps(doc).encode("utf-8"))

    # --- blobs ---------------------------------------------------------------------------
    def blob(self, path: str) -> Path:
        return self.files / check_path(path)

    def read_blob(self, path: str) -> bytes | None:
        try:
            return self.blob(path).read_bytes()
        except FileNotFoundError:
            return None

    def partial_for(self, sha256: str) -> Path:
        return self.partial / f"{sha256}.part"

    def commit_blob(self, partial: Path, path: str) -> None:
        """Move a verified download to its content-addressed name (fsynced first)."""
        dest = self.blob(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, dest)
        _fsync_dir(dest.parent)

    def gc(self, keep: set[str], keep_partial: set[str] = frozenset()) -> int:
        """Delete blobs not in `keep` (bundle paths) and partials not in `keep_partial` (sha256s); returns the count."""
        removed = 0
        keep_paths = {self.blob(p) for p in keep}
        for p in sorted(self.files.rglob("*"), reverse=True):
            if p.is_file() and p not in keep_paths:
                p.unlink(missing_ok=True)
                removed += 1
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        for p in self.partial.iterdir():
            if p.name.removesuffix(".part") not in keep_partial:
                p.unlink(missing_ok=True)
                removed += 1
        for p in self.root.glob(f".{STATE}.*.tmp"):
            p.unlink(missing_ok=True)
        return removed
