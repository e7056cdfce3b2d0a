"""Parse and verify a device bundle (BUNDLE_FORMAT.md): the signed manifest, then each file's
size and sha256 before its bytes are parsed. Pure functions of bytes; no network, no disk."""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from mobile_sdk.errors import BundleError

FORMAT = "parity-device-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ITEM_COLUMNS = {"item_id": np.int64, "embedding": np.int8, "scale": np.float32, "topic": np.int32,
                 "creator_id": np.int64, "publish_ts": np.int64, "duration_s": np.float32}


# --- keys ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PublicKey:
    """The bundle signer's Ed25519 public key and its `key_id` (BUNDLE_FORMAT.md "Keys")."""

    key: Ed25519PublicKey
    key_id: str

    @classmethod
    def load(cls, pem_or_path: bytes | str | Path) -> "PublicKey":
        if isinstance(pem_or_path, bytes) and pem_or_path.lstrip().startswith(b"-----BEGIN"):
            pem = pem_or_path
        elif isinstance(pem_or_path, (str, Path, bytes)):
            pem = Path(pem_or_path.decode() if isinstance(pem_or_path, bytes) else pem_or_path).read_bytes()
        else:
            raise TypeError(f"public_key must be PEM bytes or a path to signing.pub, got {type(pem_or_path).__name__}")
        try:
            key = load_pem_public_key(pem)
        except ValueError as exc:
            raise ValueError(f"public_key is not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"public_key must be an Ed25519 key, got {type(key).__name__}")
        raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(key, hashlib.sha256(raw).hexdigest()[:16])


# --- the manifest ---------------------------------------------------------------------------

@dataclass(frozen=True)
class FileRef:
    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SessionFeature:
    column: str
    entity: str  # user, topic, creator, item
    agg: str  # count, sum, mean
    types: tuple[int, ...]
    value: str  # one, value


@dataclass(frozen=True)
class SessionSpec:
    window_ms: int
    tile_ms: int
    features: tuple[SessionFeature, ...]


@dataclass(frozen=True)
class ItemItemSpec:
    """`model.item_item`: the neighbours in the item chunks and how the device builds the history it scores."""

    k: int
    history_len: int
    engaged_types: tuple[int, ...]
    min_value: float | None


@dataclass(frozen=True)
class ModelSpec:
    onnx: str
    ort: str
    inputs: tuple[str, ...]
    dim: int
    session: SessionSpec
    stat_columns: tuple[str, ...]
    item_item: ItemItemSpec | None = None


@dataclass(frozen=True)
class Manifest:
    """A verified manifest: `payload` is the exact signed text."""

    payload: str
    key_id: str
    version: int
    previous_version: int | None
    created_at_ms: int
    watermark_ms: int
    release_id: str
    feature_set_versions: Mapping[str, object]
    dataset_kind: str
    files: Mapping[str, FileRef]
    model: ModelSpec
    chunks: tuple[str, ...]
    stats: str
    lists: str
    prefix_len: int
    bins: Mapping[str, str]
    tombstones: int

    def ref(self, path: str) -> FileRef:
        return self.files[path]

    def bin_for(self, token: str) -> str | None:
        """Path of the bin that would list `token`, or None when the bundle has no such bin."""
        return self.bins.get(token[: self.prefix_len])


def _req(d: Mapping, key: str, kind: type | tuple[type, ...], where: str):
    if not isinstance(d, Mapping) or key not in d:
        raise BundleError(f"{where}: missing {key!r}")
    v = d[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise BundleError(f"{where}: {key!r} has the wrong type ({type(v).__name__})")
    return v


def _int(d: Mapping, key: str, where: str) -> int:
    v = _req(d, key, int, where)
    if isinstance(v, bool):
        raise BundleError(f"{where}: {key!r} must be an int")
    return v


def check_path(path: str, sha256: str | None = None) -> str:
    """A bundle path is relative, plain (no `..`, no dot-files) and its name holds its sha256."""
    parts = path.split("/") if isinstance(path, str) else []
    if not parts or not all(_SEGMENT.fullmatch(p) and ".." not in p for p in parts):
        raise BundleError(f"unsafe or malformed bundle path {path!r}")
    if sha256 is not None and sha256 not in parts[-1].split("."):
        raise BundleError(f"{path}: the name does not hold its sha256 {sha256}")
    return path


def _file_ref(path: str, entry: object, where: str) -> FileRef:
    sha = _req(entry, "sha256", str, where)
    size = _int(entry, "bytes", where)
    if not _HEX64.fullmatch(sha) or size < 0:
        raise BundleError(f"{where}: bad sha256 or size for {path!r}")
    return FileRef(check_path(path, sha), sha, size)


def _session_spec(d: object) -> SessionSpec:
    w = "model.session"
    window, tile = _int(d, "window_ms", w), _int(d, "tile_ms", w)
    if tile <= 0 or window <= 0 or window % tile:
        raise BundleError(f"{w}: window_ms {window} must be a positive multiple of tile_ms {tile}")
    feats = []
    for f in _req(d, "features", list, w):
        wf = f"{w}.features"
        feat = SessionFeature(_req(f, "column", str, wf), _req(f, "entity", str, wf), _req(f, "agg", str, wf),
                              tuple(_req(f, "types", list, wf)), _req(f, "value", str, wf))
        if (feat.entity not in ("user", "topic", "creator", "item") or feat.agg not in ("count", "sum", "mean")
                or feat.value not in ("one", "value") or not all(isinstance(t, int) and not isinstance(t, bool) for t in feat.types)):
            raise BundleError(f"{wf}: bad session feature {f!r}")
        feats.append(feat)
    return SessionSpec(window, tile, tuple(feats))


def _item_item_spec(d: object) -> ItemItemSpec | None:
    if d is None:
        return None
    w = "model.item_item"
    e = _req(d, "engagement", dict, w)
    types = tuple(_req(e, "types", list, w))
    mv = e.get("min_value")
    spec = ItemItemSpec(_int(d, "k", w), _int(d, "history_len", w), types, None if mv is None else float(mv) if isinstance(mv, (int, float)) and not isinstance(mv, bool) else float("nan"))
    if spec.k < 1 or spec.history_len < 0 or not all(isinstance(t, int) and not isinstance(t, bool) for t in types) or (
            spec.min_value is not None and not math.isfinite(spec.min_value)):
        raise BundleError(f"{w}: bad spec {d!r}")
    return spec


def parse_manifest(raw: bytes, key: PublicKey) -> Manifest:
    """Verify manifest.json's signature over the exact payload bytes, then parse the payload."""
    outer = _json(raw, "manifest.json")
    if outer.get("format") != FORMAT:
        raise BundleError(f"manifest.json: format is not {FORMAT!r}")
    key_id = _req(outer, "key_id", str, "manifest.json")
    payload = _req(outer, "payload", str, "manifest.json")
    if key_id != key.key_id:
        raise BundleError(f"manifest signed by key {key_id}, this device trusts key {key.key_id}")
    try:
        signature = base64.b64decode(_req(outer, "signature", str, "manifest.json"), validate=True)
        key.key.verify(signature, payload.encode("utf-8"))
    except (binascii.Error, InvalidSignature):
        raise BundleError("manifest signature does not verify") from None
    try:
        p = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise BundleError(f"manifest payload is not JSON: {exc}") from None
    w = "payload"
    if _int(p, "format_version", w) != FORMAT_VERSION:
        raise BundleError(f"format_version {p['format_version']} is not {FORMAT_VERSION}")
    prev = p.get("previous_version")
    if prev is not None and (not isinstance(prev, int) or isinstance(prev, bool)):
        raise BundleError("payload: previous_version must be an int or null")
    files = {path: _file_ref(path, e, "files") for path, e in _req(p, "files", dict, w).items()}
    m, items, users = _req(p, "model", dict, w), _req(p, "items", dict, w), _req(p, "users", dict, w)
    model = ModelSpec(_req(m, "onnx", str, "model"), _req(m, "ort", str, "model"), tuple(_req(m, "inputs", list, "model")),
                      _int(m, "dim", "model"), _session_spec(_req(m, "session", dict, "model")),
                      tuple(_req(m, "stat_columns", list, "model")), _item_item_spec(m.get("item_item")))
    if model.dim <= 0 or not all(isinstance(c, str) for c in model.inputs + model.stat_columns):
        raise BundleError("model: bad dim, inputs or stat_columns")
    prefix_len = _int(users, "prefix_len", "users")
    bins = dict(_req(users, "bins", dict, "users"))
    if not 0 <= prefix_len <= 64 or not all(isinstance(k, str) and len(k) == prefix_len for k in bins):
        raise BundleError("users: bin prefixes do not match prefix_len")
    man = Manifest(payload, key_id, _int(p, "version", w), prev, _int(p, "created_at_ms", w), _int(p, "watermark_ms", w),
                   str(p.get("release_id", "")), dict(p.get("feature_set_versions") or {}), str(p.get("dataset_kind", "")),
                   files, model, tuple(_req(items, "chunks", list, "items")), _req(items, "stats", str, "items"),
                   _req(items, "lists", str, "items"), prefix_len, bins, _int(p, "tombstones", w))
    for path in (model.ort, *man.chunks, man.stats, man.lists, *bins.values()):
        if not isinstance(path, str) or path not in files:
            raise BundleError(f"{path!r} is referenced but not listed in files")
    return man


# --- files ----------------------------------------------------------------------------------

def check_bytes(data: bytes, ref: FileRef) -> bytes:
    if len(data) != ref.bytes:
        raise BundleError(f"{ref.path}: {len(data)} bytes, the manifest says {ref.bytes}")
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise BundleError(f"{ref.path}: sha256 does not match the manifest")
    return data


def _npz(data: bytes, path: str, spec: Mapping[str, type]) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except Exception as exc:  # noqa: BLE001 - any parse failure of untrusted bytes is a bundle error
        raise BundleError(f"{path}: not a readable npz ({exc})") from None
    for name, dtype in spec.items():
        if name not in arrays or arrays[name].dtype != np.dtype(dtype):
            raise BundleError(f"{path}: array {name!r} missing or not {np.dtype(dtype)}")
    return arrays


def _json(data: bytes, path: str) -> dict:
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not JSON ({exc})") from None
    if not isinstance(d, dict):
        raise BundleError(f"{path}: not a JSON object")
    return d


@dataclass(frozen=True)
class ItemTable:
    """The concatenated item chunks, with stats aligned to its rows."""

    item_id: np.ndarray  # int64 (n,)
    embedding: np.ndarray  # float32 (n, d), dequantised
    topic: np.ndarray  # int32 (n,)
    creator_id: np.ndarray  # int64 (n,)
    publish_ts: np.ndarray  # int64 (n,)
    duration_s: np.ndarray  # float32 (n,)
    stats: np.ndarray  # float32 (n, len(stat_columns)), NaN missing
    _order: np.ndarray  # argsort of item_id
    nbr_id: np.ndarray | None = None  # int64 (n, k) item-item neighbours, -1 padded (model.item_item)
    nbr_w: np.ndarray | None = None  # float32 (n, k)

    def __len__(self) -> int:
        return len(self.item_id)

    @functools.cached_property
    def _sorted_ids(self) -> np.ndarray:  # once per bundle, not per rank call
        return self.item_id[self._order]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 for an id not in the table."""
        ids = np.asarray(ids, dtype=np.int64)
        sorted_ids = self._sorted_ids
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
        if len(sorted_ids) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        found = sorted_ids[pos] == ids
        return np.where(found, self._order[pos], -1).astype(np.int64)


def dequantise(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[..., None] if q.ndim == 2 else q.astype(np.float32) * np.float32(scale[0])


def parse_items(chunks: list[tuple[str, bytes]], stats: tuple[str, bytes], dim: int, stat_columns: tuple[str, ...],
                item_item: ItemItemSpec | None = None) -> ItemTable:
    parts = []
    nbr = []
    for path, data in chunks:
        a = _npz(data, path, _ITEM_COLUMNS | ({"nbr_id": np.int32, "nbr_w": np.float16} if item_item else {}))
        n = a["item_id"].shape
        if len(n) != 1 or a["embedding"].shape != (n[0], dim) or any(a[c].shape != n for c in _ITEM_COLUMNS if c != "embedding"):
            raise BundleError(f"{path}: array shapes disagree (n={n}, d={dim})")
        if item_item is not None:
            if a["nbr_id"].shape != (n[0], item_item.k) or a["nbr_w"].shape != (n[0], item_item.k):
                raise BundleError(f"{path}: item-item neighbours are not (n, {item_item.k})")
            nbr.append((a["nbr_id"].astype(np.int64), a["nbr_w"].astype(np.float32)))
        parts.append(a)
    cat = {c: np.concatenate([p[c] for p in parts]) if parts else np.zeros((0, dim) if c == "embedding" else 0, t)
           for c, t in _ITEM_COLUMNS.items()}
    if len(np.unique(cat["item_id"])) != len(cat["item_id"]):
        raise BundleError("item ids are not unique across chunks")
    spath, sdata = stats
    s = _npz(sdata, spath, {"item_id": np.int64, "values": np.float32, "as_of_ms": np.int64})
    m = s["item_id"].shape
    if len(m) != 1 or s["values"].shape != (m[0], len(stat_columns)) or (m[0] > 1 and np.any(np.diff(s["item_id"]) <= 0)):
        raise BundleError(f"{spath}: item_id must be sorted unique and values (m, {len(stat_columns)})")
    order = np.argsort(cat["item_id"], kind="stable")
    aligned = np.full((len(cat["item_id"]), len(stat_columns)), np.nan, dtype=np.float32)
    if m[0]:
        pos = np.clip(np.searchsorted(s["item_id"], cat["item_id"]), 0, m[0] - 1)
        hit = s["item_id"][pos] == cat["item_id"]
        aligned[hit] = s["values"][pos[hit]]
    nbr_id = np.concatenate([x for x, _ in nbr]) if nbr else None
    nbr_w = np.concatenate([w for _, w in nbr]) if nbr else None
    if item_item is not None and nbr_id is None:
        nbr_id, nbr_w = np.zeros((0, item_item.k), np.int64), np.zeros((0, item_item.k), np.float32)
    return ItemTable(cat["item_id"], dequantise(cat["embedding"], cat["scale"]), cat["topic"], cat["creator_id"],
                     cat["publish_ts"], cat["duration_s"], aligned, order, nbr_id, nbr_w)


@dataclass(frozen=True)
class Lists:
    popular: tuple[int, ...]
    newest: tuple[int, ...]
    as_of_ms: int


def parse_lists(path: str, data: bytes) -> Lists:
    d = _json(data, path)
    pop, new = _req(d, "popular", list, path), _req(d, "newest", list, path)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in pop + new):
        raise BundleError(f"{path}: item ids must be ints")
    return Lists(tuple(pop), tuple(new), int(d.get("as_of_ms", 0)))


@dataclass(frozen=True)
class Bin:
    prefix: str
    users: Mapping[str, FileRef]
    tombstones: frozenset[str]


def parse_bin(path: str, data: bytes, prefix: str) -> Bin:
    d = _json(data, path)
    if d.get("prefix") != prefix:
        raise BundleError(f"{path}: prefix {d.get('prefix')!r} is not {prefix!r}")
    users = {}
    for token, e in _req(d, "users", dict, path).items():
        if not _HEX64.fullmatch(token) or not token.startswith(prefix):
            raise BundleError(f"{path}: bad token {token!r}")
        users[token] = _file_ref(_req(e, "path", str, path), e, path)
    tomb = _req(d, "tombstones", list, path)
    return Bin(prefix, users, frozenset(t for t in tomb if isinstance(t, str)))


@dataclass(frozen=True)
class UserFile:
    embedding: np.ndarray  # float32 (d,), dequantised
    candidates: np.ndarray  # int64
    recent: np.ndarray  # int64
    as_of_ms: int


def parse_user(path: str, data: bytes, dim: int) -> UserFile:
    a = _npz(data, path, {"embedding": np.int8, "scale": np.float32, "candidates": np.int64, "recent": np.int64, "as_of_ms": np.int64})
    if (a["embedding"].shape != (dim,) or a["scale"].shape != (1,) or a["candidates"].ndim != 1 or a["recent"].ndim != 1
            or a["as_of_ms"].shape != ()):
        raise BundleError(f"{path}: array shapes are not as BUNDLE_FORMAT.md says (d={dim})")
    return UserFile(dequantise(a["embedding"], a["scale"]), a["candidates"], a["recent"], int(a["as_of_ms"]))
