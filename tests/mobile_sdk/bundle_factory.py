"""A small, independent writer of device bundles that follows mobile_sdk/BUNDLE_FORMAT.md to the
letter (keys, tokens, deterministic npz, content-addressed names, bins, the signed manifest),
with a real tiny ONNX ranker converted to .ort by onnxruntime's converter. The SDK tests build
real signed bundles with it; the real exporter (export/device) is tested against the SDK by the
end-to-end tests."""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import io
import json
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

DIM = 4
STAT_COLUMNS = ("ctr", "plays_7d")
SESSION = {
    "window_ms": 1_800_000, "tile_ms": 300_000,
    "features": [
        {"column": "session.topic.engaged", "entity": "topic", "agg": "count", "types": [1, 2], "value": "one"},
        {"column": "session.creator.engaged", "entity": "creator", "agg": "count", "types": [1, 2], "value": "one"},
        {"column": "session.user.play_s", "entity": "user", "agg": "sum", "types": [1], "value": "value"},
        {"column": "session.user.play_mean", "entity": "user", "agg": "mean", "types": [1], "value": "value"},
        {"column": "session.item.impressions", "entity": "item", "agg": "count", "types": [0], "value": "one"},
        {"column": "session.topic.skips", "entity": "topic", "agg": "count", "types": [3], "value": "one"},
    ],
}
INPUTS = (["emb.dot"] + [f"emb.prod[{j}]" for j in range(DIM)] + [f"item.{s}" for s in STAT_COLUMNS]
          + ["item.age_h", "item.duration_s", "context.hour_sin", "context.hour_cos"]
          + [f["column"] for f in SESSION["features"]])
# The ranker: sigmoid(W . where(isnan(x), 0, x) + B). Weights by column name, 0 for the rest.
WEIGHTS = {"emb.dot": 2.0, "item.ctr": 1.0, "item.age_h": -0.01, "session.topic.engaged": 0.5,
           "session.topic.skips": -0.75, "session.item.impressions": -0.25}
BIAS = -0.5


def reference_scores(x: np.ndarray) -> np.ndarray:
    """The ranker's function in numpy (float64), to check the SDK's features through its scores."""
    w = np.array([WEIGHTS.get(c, 0.0) for c in INPUTS], dtype=np.float32).astype(np.float64)
    clean = np.where(np.isnan(x), 0.0, x.astype(np.float64))
    return 1.0 / (1.0 + np.exp(-(clean @ w + BIAS)))


# --- keys and tokens ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Keys:
    private: Ed25519PrivateKey
    public_pem: bytes
    secret: bytes
    pub_path: Path

    @property
    def key_id(self) -> str:
        raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return hashlib.sha256(raw).hexdigest()[:16]

    def token(self, user_id: int) -> str:
        return hmac.new(self.secret, str(user_id).encode("ascii"), hashlib.sha256).hexdigest()


def make_keys(out: Path, seed: int = 0) -> Keys:
    """signing.key (PKCS#8 PEM, 0600), signing.pub (SPKI PEM), path.secret (32 bytes, 0600)."""
    out.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"key{seed}".encode()).digest())
    pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (out / "signing.key").write_bytes(private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    (out / "signing.pub").write_bytes(pem)
    secret = hashlib.sha256(f"secret{seed}".encode()).digest()
    (out / "path.secret").write_bytes(secret)
    for name in ("signing.key", "path.secret"):
        (out / name).chmod(0o600)
    return Keys(private, pem, secret, out / "signing.pub")


# --- files -------------------------------------------------------------------------------------

def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """numpy's npz, deterministic: ZIP_STORED, fixed timestamps, sorted names."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name in sorted(arrays):
            a = io.BytesIO()
            np.lib.format.write_array(a, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            z.writestr(info, a.getvalue())
    return buf.getvalue()


def quantise(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per row: scale = max|e| / 127 (1 for an all-zero row), q = round(e / scale)."""
    e = np.atleast_2d(np.asarray(e, dtype=np.float32))
    m = np.abs(e).max(axis=1)
    scale = np.where(m > 0, m / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(e / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _put(root: Path, stem: str, ext: str, data: bytes, files: dict | None) -> str:
    sha = hashlib.sha256(data).hexdigest()
    rel = f"{stem}.{sha}.{ext}"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
    if files is not None:
        files[rel] = {"sha256": sha, "bytes": len(data)}
    return rel


@functools.lru_cache(maxsize=1)
def ranker_model() -> tuple[bytes, bytes]:
    """(onnx bytes, ort bytes) of the test ranker: features [N, F] -> score [N]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    f = len(INPUTS)
    w = np.array([[WEIGHTS.get(c, 0.0)] for c in INPUTS], dtype=np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([BIAS], np.float32), "B"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat")]
    nodes = [helper.make_node("IsNaN", ["features"], ["nan"]), helper.make_node("Where", ["nan", "zero", "features"], ["x"]),
             helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["p"]), helper.make_node("Reshape", ["p", "flat"], ["score"])]
    graph = helper.make_graph(nodes, "tiny_ranker", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", f])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "ranker_int8.onnx"
        src.write_bytes(model.SerializeToString())
        convert_onnx_models_to_ort(src, output_dir=Path(d) / "out", optimization_styles=[OptimizationStyle.Fixed])
        return src.read_bytes(), (Path(d) / "out" / "ranker_int8.ort").read_bytes()


# --- bundles -----------------------------------------------------------------------------------

@dataclass
class UserSpec:
    embedding: list[float]
    candidates: list[int]
    recent: list[int] = field(default_factory=list)


@dataclass
class BundleSpec:
    version: int
    chunks: list[dict[str, np.ndarray]]  # item_id, embedding (float), topic, creator_id, publish_ts, duration_s
    stats: dict[int, list[float]]  # item_id -> values per STAT_COLUMNS
    popular: list[int]
    newest: list[int]
    users: dict[int, UserSpec]
    deleted: list[int] = field(default_factory=list)
    previous_version: int | None = None
    prefix_len: int = 1
    as_of_ms: int = 1_700_000_000_000


def item_chunk(ids, embeddings, topics, creators, publish_ts=None, duration_s=None) -> dict[str, np.ndarray]:
    n = len(ids)
    return {"item_id": np.asarray(ids, np.int64), "embedding": np.asarray(embeddings, np.float32),
            "topic": np.asarray(topics, np.int32), "creator_id": np.asarray(creators, np.int64),
            "publish_ts": np.asarray(publish_ts if publish_ts is not None else [0] * n, np.int64),
            "duration_s": np.asarray(duration_s if duration_s is not None else [0.0] * n, np.float32)}


def write_bundle(root: Path, keys: Keys, spec: BundleSpec, *, signer: Keys | None = None) -> dict:
    """Write the bundle's files into `root` (content-addressed names accumulate, as on a CDN
    origin) and replace root/manifest.json. Returns the payload dict."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    onnx_bytes, ort_bytes = ranker_model()
    model = {"onnx": _put(root, "model/ranker_int8", "onnx", onnx_bytes, files),
             "ort": _put(root, "model/ranker_int8", "ort", ort_bytes, files),
             "inputs": list(INPUTS), "dim": DIM, "session": SESSION, "stat_columns": list(STAT_COLUMNS)}
    chunks = []
    for c in spec.chunks:
        q, scale = quantise(c["embedding"])
        arrays = {k: v for k, v in c.items() if k != "embedding"} | {"embedding": q, "scale": scale}
        chunks.append(_put(root, "items/chunk", "npz", npz_bytes(arrays), files))
    sid = np.array(sorted(spec.stats), np.int64)
    values = np.array([spec.stats[i] for i in sid.tolist()], np.float32).reshape(len(sid), len(STAT_COLUMNS))
    stats = _put(root, "items/stats", "npz", npz_bytes({"item_id": sid, "values": values, "as_of_ms": np.int64(spec.as_of_ms)}), files)
    lists = _put(root, "items/lists", "json", json.dumps({"popular": spec.popular, "newest": spec.newest,
                                                          "as_of_ms": spec.as_of_ms}).encode(), files)
    bins: dict[str, dict] = {}
    for uid, u in spec.users.items():
        tok = keys.token(uid)
        q, scale = quantise(u.embedding)
        data = npz_bytes({"embedding": q[0], "scale": scale, "candidates": np.asarray(u.candidates, np.int64),
                          "recent": np.asarray(u.recent, np.int64), "as_of_ms": np.int64(spec.as_of_ms)})
        rel = _put(root, f"users/{tok}", "npz", data, None)
        b = bins.setdefault(tok[: spec.prefix_len], {"users": {}, "tombstones": []})
        b["users"][tok] = {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    for uid in spec.deleted:
        tok = keys.token(uid)
        bins.setdefault(tok[: spec.prefix_len], {"users": {}, "tombstones": []})["tombstones"].append(tok)
    bin_paths = {}
    for prefix in sorted(bins):
        doc = {"prefix": prefix, "users": bins[prefix]["users"], "tombstones": sorted(bins[prefix]["tombstones"])}
        bin_paths[prefix] = _put(root, f"users/bins/{prefix}", "json", json.dumps(doc, sort_keys=True).encode(), files)
    payload = {"format_version": 1, "version": spec.version, "previous_version": spec.previous_version,
               "created_at_ms": spec.as_of_ms, "watermark_ms": spec.as_of_ms, "release_id": "test-release",
               "feature_set_versions": {}, "dataset_kind": "simulated", "files": files, "model": model,
               "items": {"chunks": chunks, "stats": stats, "lists": lists},
               "users": {"prefix_len": spec.prefix_len, "bins": bin_paths}, "tombstones": len(spec.deleted)}
    write_manifest(root, payload, signer or keys)
    return payload


def write_manifest(root: Path, payload: dict | str, signer: Keys, *, key_id: str | None = None,
                   tamper_payload: bool = False) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, sort_keys=True, separators=(",", ":"))
    signature = base64.b64encode(signer.private.sign(text.encode("utf-8"))).decode()
    if tamper_payload:  # signed one text, ship another
        text = text.replace('"release_id":"test-release"', '"release_id":"evil-release"')
    raw = json.dumps({"format": "parity-device-bundle", "key_id": key_id or signer.key_id, "payload": text,
                      "signature": signature}).encode()
    (root / "manifest.json").write_bytes(raw)
    return raw
