"""Bundle files: deterministic npz, content-addressed names, the signed manifest.

Names hold the full sha256 of the bytes, so a CDN can cache them forever and a delta only
adds names; identical content must give identical bytes (numpy's own `savez` stamps the
current time into the zip, so arrays are written here with a fixed timestamp and order).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from export.device.keys import BundleKeys, verify_signature

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "npz_bytes", "read_npz", "BundleDir", "signed_manifest", "read_manifest",
           "ManifestError", "SHA_RE"]

FORMAT = "parity-device-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHA_RE = r"[0-9a-f]{64}"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class ManifestError(ValueError):
    """A manifest that is not a bundle manifest this code can trust."""


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """numpy's .npz (a zip of .npy files, ZIP_STORED), byte-identical for identical arrays."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            arr = np.asarray(arrays[name])  # not ascontiguousarray: it turns a 0-d array into 1-d
            if not arr.flags.c_contiguous:
                arr = arr.copy(order="C")
            if arr.dtype == object:
                raise TypeError(f"{name}: object arrays cannot go into a bundle")
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class BundleDir:
    """A bundle folder being written: content-addressed puts, and what each write cost."""

    root: Path
    written: list[str] = field(default_factory=list)  # files this run created (not already present)
    bytes_written: int = 0

    def put(self, stem: str, ext: str, data: bytes) -> tuple[str, dict]:
        """Write `data` as `<stem>.<sha256>.<ext>` (unless already there); (relative path, {sha256, bytes})."""
        digest = _sha(data)
        rel = f"{stem}.{digest}.{ext}"
        path = self.root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # temp name + rename, no fsync per file (100k user files): `sync()` makes them
            # durable at once before a manifest references them
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self.written.append(rel)
            self.bytes_written += len(data)
        return rel, {"sha256": digest, "bytes": len(data)}

    @staticmethod
    def sync() -> None:
        os.sync()

    def put_json(self, stem: str, obj: Any) -> tuple[str, dict]:
        return self.put(stem, "json", json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())

    def put_npz(self, stem: str, arrays: Mapping[str, np.ndarray]) -> tuple[str, dict]:
        return self.put(stem, "npz", npz_bytes(arrays))


def signed_manifest(payload: Mapping[str, Any], keys: BundleKeys) -> bytes:
    """manifest.json bytes: the payload as JSON text, signed over exactly those bytes."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    sig = keys.sign(text.encode("utf-8"))
    return json.dumps({"format": FORMAT, "key_id": keys.key_id, "payload": text,
                       "signature": base64.b64encode(sig).decode("ascii")}, indent=1).encode() + b"\n"


def read_manifest(path: str | os.PathLike[str], public_pem: bytes) -> dict:
    """The verified payload of a bundle's manifest.json (ManifestError otherwise)."""
    p = Path(path)
    try:
        outer = json.loads(p.read_bytes())
    except FileNotFoundError:
        raise ManifestError(f"{p}: no manifest (not a bundle?)") from None
    except ValueError as exc:
        raise ManifestError(f"{p}: not JSON ({exc})") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT or not isinstance(outer.get("payload"), str):
        raise ManifestError(f"{p}: not a {FORMAT} manifest")
    try:
        sig = base64.b64decode(outer.get("signature", ""), validate=True)
    except ValueError:
        raise ManifestError(f"{p}: the signature is not base64") from None
    if not verify_signature(public_pem, sig, outer["payload"].encode("utf-8")):
        raise ManifestError(f"{p}: the signature does not verify with this public key")
    payload = json.loads(outer["payload"])
    if payload.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{p}: format_version {payload.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return payload
