"""Releases: immutable folders the server and the device load, checked before use.

A release is written under a temporary name and renamed into place (readers never see a
half-written release), its files are made read-only, and manifest.json records the sha256
of every file. `load_release` refuses a folder whose manifest is missing or malformed (its
field types are checked once, in export.manifest_schema), whose files are missing, changed or
unexpected: a corrupted or partial release never serves. Every refusal is a ReleaseError with
the reason, never a KeyError, TypeError or OSError, so a server maps each one to
FAILED_PRECONDITION and a listing can report a broken folder and go on (`scan_releases`).
No torch here: the server imports this module.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from export.manifest import ManifestError, ReleaseManifest
from export.manifest_schema import FORMAT_VERSION, MANIFEST, clip, manifest_problem, release_id_problem, shorten
from features.part_checksum import file_sha256

__all__ = ["ReleaseError", "Release", "ReleaseSummary", "BrokenRelease", "ReleaseScan", "write_release", "load_release",
           "list_releases", "scan_releases", "new_release_id", "MANIFEST", "FORMAT_VERSION", "file_sha256"]

MAX_MANIFEST_BYTES = 64 << 20  # reference distributions make a manifest ~100 KB; anything near this is not one


class ReleaseError(ValueError):
    """A release folder that must not be served, with the reason.

    ``reason`` is the message without the folder (what `parity releases list` prints after it)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message


@dataclass(frozen=True)
class ReleaseSummary:
    """One line of `parity releases list`: the few manifest fields a person compares."""

    release_id: str
    created_at_ms: int
    dataset_kind: str
    profile: str | None
    seed: int
    int8_auc: float | None


@dataclass(frozen=True)
class Release:
    """A release folder and its manifest: `manifest` the JSON as written, `meta` the typed
    fields code reads (export/manifest.py), parsed here, once."""

    path: Path
    manifest: Mapping[str, Any]
    meta: ReleaseManifest = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "meta", ReleaseManifest.parse(self.manifest))
        except ManifestError as exc:
            raise ReleaseError(f"release {shorten(str(self.path))} refused: {exc}", str(exc)) from None

    @property
    def release_id(self) -> str:
        return self.meta.release_id

    @property
    def feature_set_versions(self) -> dict[str, str]:
        return dict(self.meta.feature_set_versions)

    def file(self, rel: str) -> Path:
        if rel not in self.meta.files:
            raise ReleaseError(f"release {self.release_id} has no file {rel!r}; it has {sorted(self.meta.files)}")
        return self.path / rel

    def summary(self) -> ReleaseSummary:
        """The listing fields; free-form parts of the manifest (config, metrics) may lack them."""
        m = self.meta
        student = m.raw["metrics"].get("ranking_test")
        student = student.get("student_int8") if isinstance(student, dict) else None
        auc = student.get("auc") if isinstance(student, dict) else None
        return ReleaseSummary(self.release_id, m.created_at_ms, m.dataset_kind, m.profile,
                              m.seed, float(auc) if isinstance(auc, (int, float)) and not isinstance(auc, bool) else None)


@dataclass(frozen=True)
class BrokenRelease:
    """A folder under a releases root that does not load, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class ReleaseScan:
    """Everything under a releases root: what loads (newest first) and what does not."""

    valid: tuple[Release, ...]
    broken: tuple[BrokenRelease, ...]


def write_release(root: str | os.PathLike[str], staged: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Release:
    """Move a staged folder (all artifacts, no manifest yet) into `root` as a release.

    The manifest's `files` is computed here from what is staged. The release id must be
    new: releases are immutable, so an existing id is an error, never an overwrite.
    """
    root, staged = Path(root), Path(staged)
    rid = manifest.get("release_id")
    bad = release_id_problem(rid)
    if bad:
        raise ReleaseError(f"cannot write release: {bad}", bad)  # it names the folder: no '/', no '..'
    final = root / rid
    if final.exists():
        raise ReleaseError(f"release {rid} already exists at {final}; releases are immutable")
    files = {}
    for p in sorted(staged.rglob("*")):
        if p.is_file():
            files[p.relative_to(staged).as_posix()] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    full = {**manifest, "format_version": FORMAT_VERSION, "files": files}
    text = json.dumps(full, indent=2, sort_keys=True, default=_json_default)
    bad = manifest_problem(json.loads(text))  # never place a folder that load_release would refuse
    if bad:
        raise ReleaseError(f"cannot write release {rid}: {bad}", bad)
    (staged / MANIFEST).write_text(text)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{rid}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(staged, tmp)
    for p in tmp.rglob("*"):
        if p.is_file():
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    os.rename(tmp, final)
    return load_release(final, require_folder_name=True)


def _json_default(o: object) -> object:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__} in a manifest")


def _refuse(shown: str, reason: str) -> ReleaseError:
    return ReleaseError(f"release {shown}: {reason}", reason)


def _read_manifest(p: Path, shown: str) -> dict:
    mp = p / MANIFEST
    try:
        st = mp.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise _refuse(shown, f"no {MANIFEST} (a partial or foreign folder)") from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(shown, f"{MANIFEST} is not a regular file")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise _refuse(shown, f"{MANIFEST} is {st.st_size} bytes (at most {MAX_MANIFEST_BYTES}): not a manifest")
    try:
        raw = mp.read_bytes()
    except OSError as exc:
        raise _refuse(shown, f"{MANIFEST} cannot be read ({exc.strerror or exc})") from None
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, a 5000-digit number, nesting too deep
        raise _refuse(shown, f"{MANIFEST} is not valid JSON ({shorten(str(exc), 120)})") from None
    bad = manifest_problem(manifest)
    if bad:
        raise _refuse(shown, bad)
    return manifest


def _check_files(p: Path, shown: str, listed: Mapping[str, Any], verify_hashes: bool) -> None:
    present = {q.relative_to(p).as_posix() for q in p.rglob("*") if q.is_file() and q.name != MANIFEST}
    if set(listed) - present:
        raise _refuse(shown, f"files missing: {clip(sorted(set(listed) - present), 200)}")
    if present - set(listed):
        raise _refuse(shown, f"unexpected files: {clip(sorted(present - set(listed)), 200)}")
    for rel, meta in listed.items():
        f = p / rel
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise _refuse(shown, f"{shorten(rel)} is {size} bytes, manifest says {meta['bytes']} (truncated or changed)")
        if verify_hashes and file_sha256(f) != meta["sha256"]:
            raise _refuse(shown, f"{shorten(rel)} does not match its sha256 (corrupted or changed)")


def load_release(path: str | os.PathLike[str], *, verify_hashes: bool = True, require_folder_name: bool = False) -> Release:
    """The release in folder ``path``, checked; ReleaseError (with the reason) for anything else.

    ``require_folder_name``: the folder must be named after its release_id, as under a
    releases root where `parity releases show ID` finds it by name. Off by default: a copy of
    a release under another name (handed to a server by path) is the same release."""
    if not isinstance(path, (str, os.PathLike)):
        raise ReleaseError(f"a release path must be a string or path, not {type(path).__name__}", "not a path")
    p = Path(path)
    shown = shorten(str(p))
    if "\0" in str(p):
        raise _refuse(shown, "the path contains a NUL byte")
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise _refuse(shown, "no such folder") from None
    except OSError as exc:  # ENAMETOOLONG for a 4 KB path, EACCES, ELOOP, EIO
        raise _refuse(shown, f"cannot be opened ({exc.strerror or exc})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(shown, "is a file, not a release folder")
    try:
        manifest = _read_manifest(p, shown)
        if require_folder_name and p.name != manifest["release_id"]:
            raise _refuse(shown, f"the folder is named {clip(p.name)} but holds release {manifest['release_id']!r} "
                                 "(renamed or copied?); rename the folder to its release id")
        _check_files(p, shown, manifest["files"], verify_hashes)
    except OSError as exc:  # a file or folder inside that cannot be listed, stat'ed or read
        name = exc.filename if isinstance(exc.filename, str) else str(p)
        raise _refuse(shown, f"cannot read {shorten(name)} ({exc.strerror or exc})") from None
    return Release(p, manifest)


def scan_releases(root: str | os.PathLike[str]) -> ReleaseScan:
    """Every release folder under ``root``: valid ones newest first, broken ones with the reason.

    Dot-named folders (a release being written) and plain files are not release folders.
    Hashes are not verified here (a listing must stay fast); serving verifies them."""
    root = Path(root)
    valid: list[Release] = []
    broken: list[BrokenRelease] = []
    try:
        entries = sorted(root.iterdir()) if root.is_dir() else []
    except OSError as exc:
        raise ReleaseError(f"releases folder {root} cannot be listed ({exc.strerror or exc})") from None
    for d in entries:
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            valid.append(load_release(d, verify_hashes=False, require_folder_name=True))
        except ReleaseError as exc:
            broken.append(BrokenRelease(d, exc.reason))
    valid.sort(key=lambda r: r.manifest["created_at_ms"], reverse=True)
    return ReleaseScan(tuple(valid), tuple(broken))


def list_releases(root: str | os.PathLike[str]) -> list[Release]:
    """Valid releases under root, newest first; broken folders are skipped (scan_releases reports them)."""
    return list(scan_releases(root).valid)


def new_release_id(fingerprint: str) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{fingerprint[:8]}"
