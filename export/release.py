"""Releases: immutable folders the server and the device load, checked before use.

A release is written under a temporary name and renamed into place (readers never see a
half-written release), its files are made read-only, and manifest.json records the sha256
of every file. `load_release` refuses a folder whose manifest is missing or malformed, whose
files are missing, changed or unexpected: a corrupted or partial release never serves.
No torch here: the server imports this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ReleaseError", "Release", "write_release", "load_release", "list_releases", "new_release_id", "MANIFEST", "FORMAT_VERSION", "file_sha256"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "release_id", "created_at_ms", "dataset", "feature_sets", "ranker_inputs", "files", "training_data", "config", "seed", "libraries", "metrics", "models")


class ReleaseError(ValueError):
    """A release folder that must not be served, with the reason."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Release:
    path: Path
    manifest: Mapping[str, Any]

    @property
    def release_id(self) -> str:
        return self.manifest["release_id"]

    @property
    def feature_set_versions(self) -> dict[str, str]:
        return {k: v["version"] for k, v in self.manifest["feature_sets"].items()}

    def file(self, rel: str) -> Path:
        if rel not in self.manifest["files"]:
            raise ReleaseError(f"release {self.release_id} has no file {rel!r}; it has {sorted(self.manifest['files'])}")
        return self.path / rel


def write_release(root: str | os.PathLike[str], staged: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Release:
    """Move a staged folder (all artifacts, no manifest yet) into `root` as a release.

    The manifest's `files` is computed here from what is staged. The release id must be
    new: releases are immutable, so an existing id is an error, never an overwrite.
    """
    root, staged = Path(root), Path(staged)
    rid = manifest["release_id"]
    final = root / rid
    if final.exists():
        raise ReleaseError(f"release {rid} already exists at {final}; releases are immutable")
    files = {}
    for p in sorted(staged.rglob("*")):
        if p.is_file():
            files[p.relative_to(staged).as_posix()] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    full = {**manifest, "format_version": FORMAT_VERSION, "files": files}
    missing = [k for k in _REQUIRED if k not in full]
    if missing:
        raise ReleaseError(f"manifest lacks {missing}")
    (staged / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True, default=_json_default))
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{rid}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(staged, tmp)
    for p in tmp.rglob("*"):
        if p.is_file():
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    os.rename(tmp, final)
    return load_release(final)


def _json_default(o: object) -> object:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__} in a manifest")


def load_release(path: str | os.PathLike[str], *, verify_hashes: bool = True) -> Release:
    p = Path(path)
    if not p.is_dir():
        raise ReleaseError(f"release {p}: no such folder")
    mp = p / MANIFEST
    if not mp.is_file():
        raise ReleaseError(f"release {p}: no {MANIFEST} (a partial or foreign folder)")
    try:
        manifest = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"release {p}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ReleaseError(f"release {p}: {MANIFEST} must be an object")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ReleaseError(f"release {p}: {MANIFEST} lacks {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ReleaseError(f"release {p}: format_version {manifest['format_version']} is not {FORMAT_VERSION}")
    listed = manifest["files"]
    present = {q.relative_to(p).as_posix() for q in p.rglob("*") if q.is_file() and q.name != MANIFEST}
    if set(listed) - present:
        raise ReleaseError(f"release {p}: files missing: {sorted(set(listed) - present)}")
    if present - set(listed):
        raise ReleaseError(f"release {p}: unexpected files: {sorted(present - set(listed))}")
    for rel, meta in listed.items():
        f = p / rel
        if f.stat().st_size != meta["bytes"]:
            raise ReleaseError(f"release {p}: {rel} is {f.stat().st_size} bytes, manifest says {meta['bytes']} (truncated or changed)")
        if verify_hashes and file_sha256(f) != meta["sha256"]:
            raise ReleaseError(f"release {p}: {rel} does not match its sha256 (corrupted or changed)")
    return Release(p, manifest)


def list_releases(root: str | os.PathLike[str]) -> list[Release]:
    """Valid releases under root, newest first; broken folders are skipped (see load_release)."""
    root = Path(root)
    out = []
    if not root.is_dir():
        return out
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            try:
                out.append(load_release(d, verify_hashes=False))
            except ReleaseError:
                continue
    return sorted(out, key=lambda r: r.manifest["created_at_ms"], reverse=True)


def new_release_id(fingerprint: str) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{fingerprint[:8]}"
