"""The device bundle writer: keys, signed manifest, content-addressed files, user files at
token paths, and deltas that write only what changed (mobile_sdk/BUNDLE_FORMAT.md).

The tiny ranker's bytes are copied, not read, by the writer: here they are placeholder files
(tests/mobile_sdk checks the real model end to end)."""
from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from export.device.bundle import bin_prefix_len, export_delta, export_device
from export.device.files import MANIFEST, ManifestError, npz_bytes, read_manifest, read_npz
from export.device.keys import KeysError, keygen, load_keys, user_token
from export.device.quant import dequantize_rows, quantize_rows
from export.release import load_release
from export.runtime import ReleaseRuntime
from features.catalog import ItemCatalog
from features.datasets import load_info, read_items
from features.eventlog import EventLog
from features.events import EventBatch, EventType
from features.history import engagement_mask


@dataclass
class _Session:
    def to_json(self) -> dict:
        return {"window_ms": 1_800_000, "tile_ms": 300_000, "features": []}


@dataclass
class _Model:
    int8_path: Path
    ort_path: Path
    columns: tuple = ("emb.dot",)
    dim: int = 0
    session: _Session = field(default_factory=_Session)
    stat_columns: tuple = ("plays_1d", "plays_7d")
    item_item: None = None

    def item_item_spec(self) -> None:
        return None


@pytest.fixture
def model(tmp_path: Path) -> _Model:
    (tmp_path / "m.onnx").write_bytes(b"int8 onnx bytes")
    (tmp_path / "m.ort").write_bytes(b"ort bytes")
    return _Model(tmp_path / "m.onnx", tmp_path / "m.ort")


@pytest.fixture
def keys(tmp_path: Path):
    return keygen(tmp_path / "keys")


def _files(bundle: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}


def test_keygen_modes_refusal_and_reload(tmp_path: Path) -> None:
    k = keygen(tmp_path / "k")
    assert stat.S_IMODE((tmp_path / "k/signing.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k/path.secret").stat().st_mode) == 0o600
    assert len((tmp_path / "k/path.secret").read_bytes()) == 32
    with pytest.raises(KeysError, match="--force"):
        keygen(tmp_path / "k")
    again = load_keys(tmp_path / "k")
    assert again.key_id == k.key_id and again.path_secret == k.path_secret
    k2 = keygen(tmp_path / "k", force=True)
    assert k2.key_id != k.key_id
    (tmp_path / "k/path.secret").chmod(0o644)
    with pytest.raises(KeysError, match="chmod 600"):
        load_keys(tmp_path / "k")


def test_token_is_hmac_of_the_decimal_id(keys) -> None:
    import hmac

    assert keys.token(42) == hmac.new(keys.path_secret, b"42", hashlib.sha256).hexdigest()
    assert keys.token(42) != keys.token(43) and len(keys.token(7)) == 64
    assert user_token(b"x" * 32, 5) != user_token(b"y" * 32, 5)
    with pytest.raises(ValueError):
        keys.token(-1)


def test_npz_is_deterministic_and_readable(tmp_path: Path) -> None:
    a = {"b": np.arange(5, dtype=np.int64), "a": np.ones((2, 3), np.int8)}
    assert npz_bytes(a) == npz_bytes(dict(reversed(list(a.items()))))
    (tmp_path / "x.npz").write_bytes(npz_bytes(a))
    back = read_npz(tmp_path / "x.npz")
    assert back["b"].tolist() == [0, 1, 2, 3, 4] and back["a"].dtype == np.int8


def test_quantisation_is_within_half_a_step() -> None:
    e = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    e[3] = 0
    qr = quantize_rows(e)
    q, s = qr.q, qr.scale
    assert q.dtype == np.int8 and s[3] == 1.0 and np.abs(q).max() <= 127
    assert (np.abs(dequantize_rows(q, s) - e) <= s[:, None] / 2 + 1e-7).all()


def test_full_export(release_dir: Path, small_sim: Path, keys, model: _Model, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    rep = export_device(release_dir, small_sim, keys, out, model)
    payload = read_manifest(out / MANIFEST, keys.public_pem)
    files = _files(out)
    # every listed file exists with its size and sha256, and its name holds the sha256
    for rel, meta in payload["files"].items():
        data = files[rel]
        assert len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"] and meta["sha256"] in rel
    events = EventLog(small_sim / "events").read().deduplicated()
    users = np.unique(events.user_id)
    assert rep.users_written == len(users) and payload["watermark_ms"] == int(events.ts.max()) + 1
    assert payload["users"]["prefix_len"] == bin_prefix_len(len(users))
    # user files: at token paths, listed in their bin with size and sha256, nowhere an id
    rel = load_release(release_dir)
    rt = ReleaseRuntime.load(rel, rankers=())
    chunk = read_npz(out / payload["items"]["chunks"][0])
    items = ItemCatalog.from_table(read_items(small_sim))
    eng = engagement_mask(events, load_info(small_sim).kind)
    listed = 0
    for prefix, brel in payload["users"]["bins"].items():
        b = json.loads(files[brel])
        for token, meta in b["users"].items():
            assert token.startswith(prefix) and meta["path"].startswith(f"users/{token}.")
            data = files[meta["path"]]
            assert hashlib.sha256(data).hexdigest() == meta["sha256"] == meta["path"].split(".")[1]
            listed += 1
    assert listed == len(users)
    u = int(users[len(users) // 2])
    token = keys.token(u)
    entry = json.loads(files[payload["users"]["bins"][token[:payload["users"]["prefix_len"]]]])["users"][token]
    uf = read_npz(out / entry["path"])
    assert str(u) not in entry["path"].split(".")[0].replace(token, "")
    seen = set(events.item_id[eng & (events.user_id == u)].tolist())
    cand = uf["candidates"].tolist()
    assert cand and not (set(cand) & seen) and len(set(cand)) == len(cand)
    pub = dict(zip(items.item_id.tolist(), items.publish_ts.tolist()))
    assert all(pub[c] < payload["watermark_ms"] for c in cand)
    assert uf["embedding"].dtype == np.int8 and uf["scale"].shape == (1,)
    # item embeddings dequantised match the release's within the int8 step
    pos = {int(x): j for j, x in enumerate(rt.vocab.tolist())}
    deq = dequantize_rows(chunk["embedding"], chunk["scale"])
    for r, x in enumerate(chunk["item_id"].tolist()):
        if x in pos:
            assert np.abs(deq[r] - rt.item_embeddings[pos[x]]).max() <= chunk["scale"][r] / 2 + 1e-6
    # a second export into the same folder gets a higher version; the same content the same names
    rep2 = export_device(release_dir, small_sim, keys, out, model)
    assert rep2.version > rep.version and rep2.files_written == 0 and _files(out).keys() == files.keys()


def _add_item(data: Path, item_id: int, publish_ts: int) -> None:
    import dataclasses

    from features.datasets import read_users, write_catalogue

    items = read_items(data)
    row = {c: [items.column(c)[0].as_py()] for c in items.column_names}
    row.update(item_id=[item_id], publish_ts=[publish_ts])
    info = load_info(data)
    write_catalogue(data, pa.concat_tables([items, pa.table(row, schema=items.schema)]), read_users(data, include_pii=True),
                    dataclasses.replace(info, n_items=info.n_items + 1))


def test_delta_writes_only_what_changed(release_dir: Path, sim_copy: Path, keys, model: _Model, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    first = export_device(release_dir, sim_copy, keys, out, model)
    before = _files(out)
    old = read_manifest(out / MANIFEST, keys.public_pem)
    log = EventLog(sim_copy / "events")
    events = log.read()
    users = np.unique(events.user_id)
    active, erased, quiet = int(users[0]), int(users[1]), int(users[2])
    new_item = int(read_items(sim_copy).column("item_id").to_numpy().max()) + 1
    _add_item(sim_copy, new_item, publish_ts=int(events.ts.max()) - 1000)
    w = int(old["watermark_ms"])
    log.append(EventBatch.from_rows([{"event_id": 10**12 + i, "ts": w + i, "user_id": active, "item_id": int(events.item_id[i]),
                                      "topic": int(events.topic[i]), "type": EventType.PLAY, "value": 20.0} for i in range(3)]))
    log.delete_user(erased, reason="test erasure")

    def entry(payload, uid):
        t = keys.token(uid)
        b = json.loads((out / payload["users"]["bins"][t[: payload["users"]["prefix_len"]]]).read_text())
        return b["users"].get(t), t in b["tombstones"]

    old_entries = {u: entry(old, u) for u in (active, erased, quiet)}
    rep = export_delta(out, sim_copy, keys, release_dir=release_dir)
    new = read_manifest(out / MANIFEST, keys.public_pem)
    after = _files(out)
    assert rep.version > first.version and new["previous_version"] == old["version"] and new["watermark_ms"] == w + 3
    assert rep.items_added == 1 and rep.users_written == 1 and rep.users_tombstoned == 1 and new["tombstones"] == 1
    # the model and the first chunk are untouched; one new chunk holds the new item, embedded by content
    assert new["model"] == old["model"] and new["items"]["chunks"][0] == old["items"]["chunks"][0] and len(new["items"]["chunks"]) == 2
    chunk = read_npz(out / new["items"]["chunks"][1])
    assert chunk["item_id"].tolist() == [new_item]
    rt = ReleaseRuntime.load(load_release(release_dir), rankers=())
    content = rt.content_embeddings(ItemCatalog.from_table(read_items(sim_copy)), np.asarray([new_item]))
    assert np.abs(dequantize_rows(chunk["embedding"], chunk["scale"]) - content).max() <= chunk["scale"][0] / 2 + 1e-6
    # users: the active one has a new file, the quiet one the same file, the erased one none (a tombstone instead)
    assert entry(new, quiet) == old_entries[quiet] and old_entries[erased][0] is not None
    a_old, a_new = old_entries[active][0], entry(new, active)[0]
    assert a_new["path"] != a_old["path"] and not (out / a_old["path"]).exists()
    assert entry(new, erased) == (None, True)
    assert not any(keys.token(erased) in p for p in after)
    # only new names were written; nothing listed before was rewritten in place
    written = set(after) - set(before)
    assert all(after[p] == before[p] for p in set(after) & set(before) if p != MANIFEST)
    assert rep.files_written == len(written) and len(written) <= 2 + 1 + 2 + 3  # chunk, user, stats+lists, <= 3 bins

def test_manifest_signature_is_checked(release_dir: Path, small_sim: Path, keys, model: _Model, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    export_device(release_dir, small_sim, keys, out, model)
    outer = json.loads((out / MANIFEST).read_text())
    other = keygen(tmp_path / "other")
    with pytest.raises(ManifestError, match="signature"):
        read_manifest(out / MANIFEST, other.public_pem)
    outer["payload"] = outer["payload"].replace('"version":', '"version":1').replace('"version":1', '"version":', 1) + " "
    (out / MANIFEST).write_text(json.dumps(outer))
    with pytest.raises(ManifestError, match="signature"):
        read_manifest(out / MANIFEST, keys.public_pem)
    # a folder another key signed is not overwritten
    with pytest.raises(ValueError, match="did not sign|empty"):
        export_device(release_dir, small_sim, other, out, model)


def test_a_delta_refuses_to_re_sign_a_file_changed_on_disk(release_dir: Path, sim_copy: Path, keys, model: _Model, tmp_path: Path) -> None:
    """A delta carries the old bins over and signs them again: a bin edited on the origin (a user
    pointed at another user's file, say) must stop it, not be blessed by a fresh signature."""
    out = tmp_path / "bundle"
    export_device(release_dir, sim_copy, keys, out, model)
    old = read_manifest(out / MANIFEST, keys.public_pem)
    rel = next(iter(old["users"]["bins"].values()))
    p = out / rel
    p.chmod(0o644)
    b = json.loads(p.read_text())
    b["tombstones"].append("0" * 64)
    p.write_text(json.dumps(b))
    with pytest.raises(ValueError, match="does not match the signed manifest"):
        export_delta(out, sim_copy, keys, release_dir=release_dir)
    assert read_manifest(out / MANIFEST, keys.public_pem)["version"] == old["version"]  # nothing re-signed
