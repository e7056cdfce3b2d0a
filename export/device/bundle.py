"""`parity export device` and `parity export delta`: a release's device bundle, full or incremental.

A full export writes the tiny ranker, the item table (int8 embeddings, attributes, stats,
popular and newest lists) and one file per user at a path derived from the user's token,
then the signed manifest (mobile_sdk/BUNDLE_FORMAT.md). A delta, without retraining, adds
an item chunk for items that appeared since the bundle (embedded by the item tower's content
path, as the server embeds new items), recomputes the users with events since the bundle's
watermark, drops erased users (tombstones in their bin) and rewrites only what changed; the
manifest's version goes up. The manifest is replaced last and atomically, so a reader sees
the old bundle or the new one; files the new manifest no longer references are removed after
it (a device mid-sync on the old manifest gets a 404 and syncs again).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import pyarrow as pa

from export.device.files import FORMAT_VERSION, MANIFEST, BundleDir, ManifestError, read_manifest, read_npz, signed_manifest
from export.device.keys import BundleKeys
from export.device.quant import quantize_rows
from export.device.training_rows import check_feature_sets
from export.device.users import N_CANDIDATES, UserStates, user_states
from export.release import Release, ReleaseError, load_release
from export.runtime import ReleaseRuntime
from features.assemble import columns_from_join
from features.atomic import write_atomic
from features.part_checksum import file_sha256
from features.catalog import ItemCatalog
from features.datasets import load_info, read_items
from features.eventlog import EventLog
from features.events import EventBatch
from features.item_item import SparseItemItem, sparsify
from features.pit import PitJoiner
from features.repo import feature_sets
from models.popularity import popularity

__all__ = ["DeviceModelFiles", "ExportReport", "export_device", "export_delta", "N_POPULAR", "N_NEWEST", "bin_prefix_len"]

N_POPULAR = 100
N_NEWEST = 50


class DeviceModelFiles(Protocol):
    """What a bundle needs of the tiny ranker (export.device.tiny_model.DeviceModel has it)."""

    int8_path: Path
    ort_path: Path
    columns: tuple[str, ...]
    dim: int
    session: Any  # features.session.SessionSpec (to_json())
    stat_columns: tuple[str, ...]
    item_item: SparseItemItem | None

    def item_item_spec(self) -> dict | None: ...


@dataclass(frozen=True)
class ExportReport:
    bundle: Path
    version: int
    previous_version: int | None
    release_id: str
    watermark_ms: int
    users_written: int
    users_tombstoned: int
    items_total: int
    items_added: int
    files_written: int
    bytes_written: int
    bytes_per_user: float
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


@dataclass
class _Inputs:
    release: Release
    runtime: ReleaseRuntime
    kind: str
    sets: dict
    events: EventBatch
    items: ItemCatalog
    half_life_ms: int | None


def _load(release_dir: str | Path, data_dir: str | Path) -> _Inputs:
    release = load_release(release_dir)
    info = load_info(data_dir)
    sets = {fs.name: fs for fs in feature_sets(info.kind, info.n_topics)}
    try:
        check_feature_sets(release, info.kind, info.n_topics)
    except ReleaseError as exc:
        raise ReleaseError(f"--release: {exc}") from None
    rt = ReleaseRuntime.load(release, rankers=())
    events = EventLog(Path(data_dir) / "events").read(must_exist=True).deduplicated()
    if len(events) == 0:
        raise ValueError(f"--events: {data_dir} has no events")
    items = ItemCatalog.from_table(read_items(data_dir))
    return _Inputs(release, rt, info.kind, sets, events, items, release.manifest["config"].get("popularity_half_life_ms"))


def bin_prefix_len(n_users: int, per_bin: int = 256) -> int:
    """Hex chars of the token that name a user's bin: the fewest giving <= per_bin users a bin (1..4)."""
    n = 1
    while n < 4 and n_users > per_bin * 16 ** n:
        n += 1
    return n


def _item_chunk(inp: _Inputs, ids: np.ndarray, item_item: SparseItemItem | None = None) -> dict[str, np.ndarray]:
    """Rows of the item table for `ids`: release embeddings, content embeddings for the rest;
    with `item_item`, each item's neighbours (int32 ids, -1 padded) and float16 weights."""
    rt, cat = inp.runtime, inp.items
    ids = np.asarray(ids, dtype=np.int64)
    emb = np.zeros((len(ids), rt.item_embeddings.shape[1]), dtype=np.float32)
    vpos = {int(x): j for j, x in enumerate(rt.vocab.tolist())}
    in_vocab = np.asarray([int(x) in vpos for x in ids.tolist()], dtype=bool)
    if in_vocab.any():
        emb[in_vocab] = rt.item_embeddings[[vpos[int(x)] for x in ids[in_vocab].tolist()]]
    row = cat.index(ids)
    new = ~in_vocab & (row >= 0)
    if new.any():
        emb[new] = rt.content_embeddings(cat, ids[new])
    qr = quantize_rows(emb)
    ok, r = row >= 0, np.maximum(row, 0)
    out = {"item_id": ids, "embedding": qr.q, "scale": qr.scale,
           "topic": np.where(ok, cat.topic[r], -1).astype(np.int32), "creator_id": np.where(ok, cat.creator_id[r], -1).astype(np.int64),
           "publish_ts": np.where(ok, cat.publish_ts[r], 0).astype(np.int64), "duration_s": np.where(ok, cat.duration_s[r], 0).astype(np.float32)}
    if item_item is not None:
        k = item_item.nbr_id.shape[1]
        rr = item_item.rows(ids)
        known = rr >= 0
        nbr_id = np.full((len(ids), k), -1, dtype=np.int32)
        nbr_w = np.zeros((len(ids), k), dtype=np.float16)
        nbr_id[known] = item_item.nbr_id[rr[known]]
        nbr_w[known] = item_item.nbr_w[rr[known]].astype(np.float16)  # float16 values already: exact
        out.update(nbr_id=nbr_id, nbr_w=nbr_w)
    return out


def _stats(inp: _Inputs, ids: np.ndarray, stat_columns: Sequence[str], as_of: int) -> dict[str, np.ndarray]:
    item_set = inp.sets[inp.runtime.inputs.item_set]
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    cols = columns_from_join(PitJoiner([item_set], inp.events).join(pa.table({"item_id": ids, "ts": np.full(len(ids), as_of, np.int64)})), [item_set])
    values = np.stack([np.where(cols[f"{item_set.name}.{c}"][1], np.nan, cols[f"{item_set.name}.{c}"][0]) for c in stat_columns], axis=1) \
        if stat_columns else np.zeros((len(ids), 0))
    return {"item_id": ids, "values": values.astype(np.float32), "as_of_ms": np.asarray(as_of, dtype=np.int64)}


def _lists(inp: _Inputs, as_of: int) -> dict:
    pop = popularity(inp.events, inp.kind, as_of, half_life_ms=inp.half_life_ms)[0][:N_POPULAR]
    cat = inp.items
    live = np.flatnonzero((cat.publish_ts < as_of) & (cat.publish_ts > 0))
    newest = cat.item_id[live[np.lexsort((cat.item_id[live], -cat.publish_ts[live]))]][:N_NEWEST]
    return {"popular": [int(x) for x in pop], "newest": [int(x) for x in newest], "as_of_ms": int(as_of)}


def _user_file(st: UserStates, r: int) -> dict[str, np.ndarray]:
    qr = quantize_rows(st.embeddings[r:r + 1])
    return {"embedding": qr.q[0], "scale": qr.scale.astype(np.float32), "candidates": st.candidate_list(r),
            "recent": st.recent_list(r), "as_of_ms": np.asarray(st.as_of_ms, dtype=np.int64)}


def _write_users(bd: BundleDir, keys: BundleKeys, st: UserStates, bins: dict[str, dict], prefix_len: int) -> int:
    before = bd.bytes_written
    for r, uid in enumerate(st.user_ids.tolist()):
        token = keys.token(int(uid))
        rel, meta = bd.put_npz(f"users/{token}", _user_file(st, r))
        b = bins.setdefault(token[:prefix_len], {"prefix": token[:prefix_len], "users": {}, "tombstones": []})
        b["users"][token] = {"path": rel, **meta}
        if token in b["tombstones"]:
            b["tombstones"].remove(token)
    return bd.bytes_written - before


def _version(previous: int | None) -> int:
    now = int(time.time() * 1000)
    return now if previous is None or now > previous else previous + 1


def _finish(bd: BundleDir, keys: BundleKeys, payload: dict, bins: dict[str, dict]) -> dict:
    """Write the bins, sign and place the manifest, then remove what it no longer references."""
    files = payload["files"]
    payload["users"]["bins"] = {}
    for prefix in sorted(bins):
        b = bins[prefix]
        b["tombstones"] = sorted(set(b["tombstones"]))
        rel, meta = bd.put_json(f"users/bins/{prefix}", b)
        payload["users"]["bins"][prefix] = rel
        files[rel] = meta
    data = signed_manifest(payload, keys)
    bd.sync()  # every file the manifest names is durable before the manifest is
    write_atomic(bd.root / MANIFEST, lambda f: f.write(data))
    keep = set(files) | {u["path"] for b in bins.values() for u in b["users"].values()}
    for p in bd.root.rglob("*"):
        rel = p.relative_to(bd.root).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in keep and not p.name.startswith("."):
            p.unlink()
    return payload


def _payload(inp: _Inputs, model: DeviceModelFiles | dict, version: int, previous: int | None, watermark: int) -> dict:
    return {"format_version": FORMAT_VERSION, "version": version, "previous_version": previous,
            "created_at_ms": int(time.time() * 1000), "watermark_ms": int(watermark),
            "release_id": inp.release.release_id, "feature_set_versions": inp.release.feature_set_versions,
            "dataset_kind": inp.kind, "files": {}, "model": model, "items": {}, "users": {}, "tombstones": 0}


def export_device(release_dir: str | Path, data_dir: str | Path, keys: BundleKeys, out: str | Path, model: DeviceModelFiles, *,
                  users: Sequence[int] | np.ndarray | None = None, n_candidates: int = N_CANDIDATES) -> ExportReport:
    """A full bundle in `out` (a new or empty folder, or an earlier bundle of the same keys,
    whose version the new one exceeds). `users`: None = every user of the event log."""
    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    out = Path(out)
    previous = None
    if (out / MANIFEST).exists():
        try:
            previous = read_manifest(out / MANIFEST, keys.public_pem)["version"]
        except ManifestError as exc:
            raise ValueError(f"--out: {out} holds a bundle these keys did not sign ({exc}); choose an empty folder") from None
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"--out: {out} is neither empty nor a bundle; choose an empty folder")
    inp = _load(release_dir, data_dir)
    watermark = int(inp.events.ts.max()) + 1
    secs["load"] = time.perf_counter() - t0
    bd = BundleDir(out)
    t = time.perf_counter()
    files: dict[str, dict] = {}
    onnx_rel, meta = bd.put("model/ranker_int8", "onnx", Path(model.int8_path).read_bytes())
    files[onnx_rel] = meta
    ort_rel, meta = bd.put("model/ranker_int8", "ort", Path(model.ort_path).read_bytes())
    files[ort_rel] = meta
    ids = np.union1d(inp.items.item_id, inp.runtime.vocab)
    chunk_rel, meta = bd.put_npz("items/chunk", _item_chunk(inp, ids, model.item_item))
    files[chunk_rel] = meta
    stats_rel, meta = bd.put_npz("items/stats", _stats(inp, ids, model.stat_columns, watermark))
    files[stats_rel] = meta
    lists_rel, meta = bd.put_json("items/lists", _lists(inp, watermark))
    files[lists_rel] = meta
    secs["items"] = time.perf_counter() - t
    t = time.perf_counter()
    uids = np.unique(inp.events.user_id) if users is None else np.unique(np.asarray(users, dtype=np.int64))
    st = user_states(inp.runtime, inp.events, inp.items, inp.sets[inp.runtime.inputs.user_set], inp.kind, uids, watermark,
                     n_candidates=n_candidates)
    secs["user_states"] = time.perf_counter() - t
    t = time.perf_counter()
    prefix_len = bin_prefix_len(len(uids))
    bins: dict[str, dict] = {}
    user_bytes = _write_users(bd, keys, st, bins, prefix_len)
    secs["user_files"] = time.perf_counter() - t
    version = _version(previous)
    model_meta = {"onnx": onnx_rel, "ort": ort_rel, "inputs": list(model.columns), "dim": int(model.dim),
                  "session": model.session.to_json(), "stat_columns": list(model.stat_columns), "item_item": model.item_item_spec()}
    payload = _payload(inp, model_meta, version, None, watermark)
    payload["files"] = files
    payload["items"] = {"chunks": [chunk_rel], "stats": stats_rel, "lists": lists_rel}
    payload["users"] = {"prefix_len": prefix_len, "bins": {}}
    t = time.perf_counter()
    _finish(bd, keys, payload, bins)
    secs["manifest"] = time.perf_counter() - t
    secs["total"] = time.perf_counter() - t0
    return ExportReport(out, version, None, inp.release.release_id, watermark, len(uids), 0, len(ids), len(ids), len(bd.written),
                        bd.bytes_written, user_bytes / max(len(uids), 1), {k: round(v, 3) for k, v in secs.items()})


def _find_release(release_id: str, data_dir: Path, given: str | Path | None) -> Path:
    if given is not None:
        return Path(given)
    for root in (data_dir.parent / "releases", Path("releases")):
        if (root / release_id).is_dir():
            return root / release_id
    raise ValueError(f"--release: the bundle was made from release {release_id}; pass its folder with --release "
                     f"(looked in {data_dir.parent / 'releases'} and ./releases)")


def _verified(bundle: Path, rel: str, files: dict) -> Path:
    """A file of the bundle, checked against the signed manifest before a delta builds on it:
    a delta re-signs what it carries over, so a changed file must stop it, not be blessed."""
    meta = files.get(rel)
    path = bundle / rel
    if meta is None or not path.is_file() or path.stat().st_size != meta["bytes"] or file_sha256(path) != meta["sha256"]:
        raise ValueError(f"--bundle: {rel} is missing or does not match the signed manifest (changed on disk?); export a full bundle")
    return path


def export_delta(bundle: str | Path, data_dir: str | Path, keys: BundleKeys, *, release_dir: str | Path | None = None) -> ExportReport:
    """Bring a bundle up to the event log without retraining; only changed files are written."""
    t0 = time.perf_counter()
    bundle, data_dir = Path(bundle), Path(data_dir)
    try:
        old = read_manifest(bundle / MANIFEST, keys.public_pem)
    except ManifestError as exc:
        raise ValueError(f"--bundle: {exc}") from None
    inp = _load(_find_release(old["release_id"], data_dir, release_dir), data_dir)
    if inp.release.release_id != old["release_id"]:
        raise ValueError(f"--release: {inp.release.release_id} is not the bundle's release {old['release_id']}")
    bd = BundleDir(bundle)
    files = {k: v for k, v in old["files"].items() if not k.startswith(("users/bins/", "items/stats.", "items/lists."))}
    chunks = list(old["items"]["chunks"])
    have = np.concatenate([read_npz(_verified(bundle, c, old["files"]))["item_id"] for c in chunks])
    new_ids = np.setdiff1d(inp.items.item_id, have)
    watermark = max(int(inp.events.ts.max()) + 1, int(old["watermark_ms"]))
    if len(new_ids):
        spec = old["model"].get("item_item")
        sparse = sparsify(inp.runtime.item_item, int(spec["k"])) if spec and inp.runtime.item_item is not None else None
        if spec and sparse is None:
            raise ValueError(f"--release: the bundle's ranker reads item.item_item but release {inp.release.release_id} has no item-item model")
        rel, meta = bd.put_npz("items/chunk", _item_chunk(inp, new_ids, sparse))
        files[rel] = meta
        chunks.append(rel)
    all_ids = np.union1d(have, new_ids)
    stats_rel, meta = bd.put_npz("items/stats", _stats(inp, all_ids, old["model"]["stat_columns"], watermark))
    files[stats_rel] = meta
    lists_rel, meta = bd.put_json("items/lists", _lists(inp, watermark))
    files[lists_rel] = meta
    bins = {p: json.loads(_verified(bundle, rel, old["files"]).read_text()) for p, rel in old["users"]["bins"].items()}
    prefix_len = int(old["users"]["prefix_len"])
    # erased users: an audit record and no events left; their files go, their tokens become tombstones
    present = set(np.unique(inp.events.user_id).tolist())
    erased = {int(r["user_id"]) for r in EventLog(data_dir / "events").audit_records()} - present
    tomb = 0
    for uid in sorted(erased):
        token = keys.token(uid)
        b = bins.get(token[:prefix_len])
        if b is not None and token in b["users"]:
            del b["users"][token]
            b["tombstones"].append(token)
            tomb += 1
    changed = np.unique(inp.events.user_id[inp.events.ts >= int(old["watermark_ms"])])
    st = user_states(inp.runtime, inp.events, inp.items, inp.sets[inp.runtime.inputs.user_set], inp.kind, changed, watermark)
    user_bytes = _write_users(bd, keys, st, bins, prefix_len)
    version = _version(int(old["version"]))
    payload = _payload(inp, old["model"], version, int(old["version"]), watermark)
    payload["files"] = files
    payload["items"] = {"chunks": chunks, "stats": stats_rel, "lists": lists_rel}
    payload["users"] = {"prefix_len": prefix_len, "bins": {}}
    payload["tombstones"] = int(old.get("tombstones", 0)) + tomb
    _finish(bd, keys, payload, bins)
    return ExportReport(bundle, version, int(old["version"]), inp.release.release_id, watermark, len(changed), tomb, len(all_ids),
                        len(new_ids), len(bd.written), bd.bytes_written, user_bytes / max(len(changed), 1),
                        {"total": round(time.perf_counter() - t0, 3)})
