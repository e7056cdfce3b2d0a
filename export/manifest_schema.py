"""The shape of a release manifest, checked once at load so no reader meets a wrong type later.

Pure: a parsed manifest in, the first problem out (or None). export.release turns a problem
into a ReleaseError naming the folder. Readers further on (the server's skew guard, the
runtime, `parity releases list`) index these fields directly; this is what makes that safe.

Every value a message echoes from the manifest is clipped to about 80 characters, so a
hostile manifest cannot flood a log line or an RPC status.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["FORMAT_VERSION", "MANIFEST", "REQUIRED", "clip", "shorten", "file_path_problem", "manifest_problem", "release_id_problem"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
REQUIRED = ("format_version", "release_id", "created_at_ms", "dataset", "feature_sets", "ranker_inputs", "files", "training_data",
            "config", "seed", "libraries", "metrics", "models")
_OBJECTS = ("dataset", "feature_sets", "ranker_inputs", "files", "training_data", "config", "libraries", "metrics", "models")
_OPTIONAL_OBJECTS = ("retrieval", "reference", "timings_s")
_RELEASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_RELEASE_ID = 128
MAX_FILE_PATH = 512
_SHA256 = re.compile(r"[0-9a-f]{64}")


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(value: Any, limit: int = 80) -> str:
    """repr of ``value``, cut to ``limit`` characters with an ellipsis."""
    return shorten(repr(value), limit)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _got(v: Any) -> str:
    """What a wrong value is, for a message: its JSON kind and its (clipped) text."""
    if v is None:
        return "null"
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}.get(type(v), type(v).__name__)
    return f"{kind} {clip(v)}"


def release_id_problem(rid: Any) -> str | None:
    """Why ``rid`` cannot name a release folder (it becomes one), or None."""
    if not isinstance(rid, str):
        return f"release_id must be a string, not {_got(rid)}"
    if not 0 < len(rid) <= MAX_RELEASE_ID or not _RELEASE_ID.fullmatch(rid) or rid in (".", ".."):
        return (f"release_id {clip(rid)} is not a safe folder name (1-{MAX_RELEASE_ID} characters: letters, digits, "
                "'.', '_', '-'; not starting with '.' or '-')")
    return None


def file_path_problem(rel: str) -> str | None:
    """Why ``rel`` (a key of ``files``) is not a plain path inside the release folder, or None."""
    if len(rel) > MAX_FILE_PATH:
        return f"files: {clip(rel)} is {len(rel)} characters long (at most {MAX_FILE_PATH})"
    if "\0" in rel or "\\" in rel:
        return f"files: {clip(rel)} holds a NUL byte or a backslash"
    if rel.startswith("/"):
        return f"files: {clip(rel)} is an absolute path; entries are relative to the release folder"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"files: {clip(rel)} is not a plain relative path (empty, '.' or '..' parts would leave or alias the folder)"
    if rel == MANIFEST:
        return f"files: lists {MANIFEST} itself"
    return None


def _files_problem(files: Mapping[str, Any]) -> str | None:
    for rel, meta in files.items():
        bad = file_path_problem(rel)
        if bad:
            return bad
        if not isinstance(meta, dict):
            return f"files[{clip(rel)}] must be an object with sha256 and bytes, not {_got(meta)}"
        if not isinstance(meta.get("sha256"), str) or not _SHA256.fullmatch(meta["sha256"]):
            return f"files[{clip(rel)}].sha256 must be 64 lowercase hex digits, not {_got(meta.get('sha256'))}"
        if not _is_int(meta.get("bytes")) or meta["bytes"] < 0:
            return f"files[{clip(rel)}].bytes must be a non-negative integer, not {_got(meta.get('bytes'))}"
    return None


def _ranker_inputs_problem(ri: Mapping[str, Any]) -> str | None:
    for key in ("user_set", "item_set", "affinity"):
        if not isinstance(ri.get(key), str):
            return f"ranker_inputs.{key} must be a string, not {_got(ri.get(key))}"
    pairs = ri.get("pair_sets")
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        return f"ranker_inputs.pair_sets must be a list of [set name, item column] string pairs, not {_got(pairs)}"
    cols = ri.get("columns")
    if not isinstance(cols, list) or not cols or not all(isinstance(c, str) for c in cols):
        return f"ranker_inputs.columns must be a non-empty list of strings, not {_got(cols)}"
    return None


def manifest_problem(m: Any) -> str | None:
    """The first thing wrong with a parsed manifest's shape, or None if every field has its type."""
    if not isinstance(m, dict):
        return f"{MANIFEST} must be an object, not {_got(m)}"
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        return f"{MANIFEST} lacks {missing}"
    if not _is_int(m["format_version"]) or m["format_version"] != FORMAT_VERSION:
        return f"format_version {clip(m['format_version'])} is not {FORMAT_VERSION}"
    bad = release_id_problem(m["release_id"])
    if bad:
        return bad
    if not _is_int(m["created_at_ms"]) or m["created_at_ms"] < 0:
        return f"created_at_ms must be a non-negative integer (ms since the epoch), not {_got(m['created_at_ms'])}"
    if not _is_int(m["seed"]):
        return f"seed must be an integer, not {_got(m['seed'])}"
    for key in _OBJECTS + tuple(k for k in _OPTIONAL_OBJECTS if m.get(k) is not None):
        if not isinstance(m[key], dict):
            return f"{key} must be an object, not {_got(m[key])}"
    if not isinstance(m["dataset"].get("kind"), str):
        return f"dataset.kind must be a string, not {_got(m['dataset'].get('kind'))}"
    for name, fs in m["feature_sets"].items():
        if not isinstance(fs, dict) or not isinstance(fs.get("version"), str) or not fs["version"]:
            return f"feature_sets[{clip(name)}] must be an object with a version string, not {_got(fs)}"
    bad = _ranker_inputs_problem(m["ranker_inputs"]) or _files_problem(m["files"])
    if bad:
        return bad
    for name, rel in m["models"].items():
        if not isinstance(rel, str) or rel not in m["files"]:
            return f"models[{clip(name)}] must name a file the release lists, not {_got(rel)}"
    return None
