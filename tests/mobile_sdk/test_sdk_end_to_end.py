"""The real export, served by the CDN stand-in, synced and ranked by the SDK: the same numbers
on both sides (issue 10's parity proofs), and a delta fetched incrementally.

- scores: the SDK's (.ort, its own feature code) equal the export side's (export.device.inputs
  + the int8 .onnx) for the same user, candidates, time and session, to 1e-5;
- session features: the same events through the SDK's session log and through the feature
  store's point-in-time join (features/session.py) give the same values;
- item embeddings dequantised from the bundle match the release's within the int8 step.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from export.device.bundle import export_delta, export_device
from export.device.cdn import BackgroundCDN
from export.device.files import MANIFEST, read_manifest, read_npz
from export.device.inputs import DeviceRows, device_matrix
from export.device.keys import BundleKeys, keygen
from export.device.quant import dequantize_rows
from export.device.tiny_model import DeviceModel, build_device_model, device_session
from export.release import load_release
from export.runtime import ReleaseRuntime
from features.eventlog import EventLog
from features.events import EventBatch, EventType
from features.history import last_distinct
from features.pit import PitJoiner
from features.session import session_columns, session_sets, session_values
from mobile_sdk import Client, Event


@dataclass(frozen=True)
class Device:
    model: DeviceModel
    keys: BundleKeys
    data: Path
    bundle: Path
    release: Path


@pytest.fixture(scope="module")
def list_release(small_sim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release whose rankers learn on candidate lists: it has an item-item model, so its
    device ranker reads `item.item_item` and the bundle ships the sparse neighbours."""
    from pipeline.train import train_release

    return train_release(small_sim, tmp_path_factory.mktemp("list-releases"), profile="tiny", seed=0, ranker_rows="candidates").path


@pytest.fixture(scope="module")
def labelled_release(small_sim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release whose rankers learn on labelled impression rows: no item-item model."""
    from pipeline.train import train_release

    return train_release(small_sim, tmp_path_factory.mktemp("labelled-releases"), profile="tiny", seed=0, ranker_rows="labelled").path


@pytest.fixture(scope="module", params=["labelled", "lists"])
def device(request, small_sim: Path, tmp_path_factory: pytest.TempPathFactory):
    release_dir = request.getfixturevalue("list_release" if request.param == "lists" else "labelled_release")
    root = tmp_path_factory.mktemp("device")
    model = build_device_model(release_dir, small_sim, root / "model", seed=0, profile="tiny")
    assert ("item.item_item" in model.columns) == (request.param == "lists")
    keys = keygen(root / "keys")
    data = root / "data"
    shutil.copytree(small_sim, data)
    export_device(release_dir, data, keys, root / "bundle", model)
    return Device(model, keys, data, root / "bundle", release_dir)


def _user_entry(bundle: Path, payload: dict, token: str) -> dict | None:
    b = json.loads((bundle / payload["users"]["bins"][token[: payload["users"]["prefix_len"]]]).read_text())
    return b["users"].get(token)


def _sdk_events(rng: np.random.Generator, chunk: dict, now: int, n: int) -> list[Event]:
    rows = rng.integers(0, len(chunk["item_id"]), n)
    ts = np.sort(now - rng.integers(1, 40 * 60_000, n))
    types = rng.choice([0, 1, 2, 3], n)
    return [Event(int(t), int(chunk["item_id"][r]), int(ty), float(rng.integers(1, 60)) if ty == 1 else 1.0,
                  int(chunk["topic"][r]), int(chunk["creator_id"][r])) for t, r, ty in zip(ts, rows, types)]


def test_sdk_scores_equal_the_export_side(device, tmp_path: Path) -> None:
    model, keys, data, bundle = device.model, device.keys, device.data, device.bundle
    payload = read_manifest(bundle / MANIFEST, keys.public_pem)
    kind = payload["dataset_kind"]
    events = EventLog(data / "events").read()
    user = int(np.bincount(events.user_id).argmax())
    token = keys.token(user)
    with BackgroundCDN(bundle) as cdn:
        client = Client(cdn.url, tmp_path / "cache", keys.public_pem, token)
        res = client.sync()
        assert res.changed and res.user_file
    chunk = read_npz(bundle / payload["items"]["chunks"][0])
    stats = read_npz(bundle / payload["items"]["stats"])
    uf = read_npz(bundle / _user_entry(bundle, payload, token)["path"])
    now = int(payload["watermark_ms"]) + 7 * 60_000
    rng = np.random.default_rng(0)
    recorded = _sdk_events(rng, chunk, now, 25)
    for e in recorded:
        client.record(e)
    ranked = client.rank(user, context={"now_ms": now}, k=1000)  # offline: the CDN is gone
    assert ranked.source == "user" and len(ranked) > 0
    ids = np.asarray([i for i, _ in ranked], dtype=np.int64)
    sdk_scores = np.asarray([s for _, s in ranked], dtype=np.float64)
    # the export side, from the bundle's files and the feature store's session sets
    row = {int(x): r for r, x in enumerate(chunk["item_id"].tolist())}
    r = np.asarray([row[int(x)] for x in ids])
    item_emb = dequantize_rows(chunk["embedding"], chunk["scale"])[r]
    user_emb = np.repeat(dequantize_rows(uf["embedding"][None, :], uf["scale"]), len(ids), axis=0)
    srow = np.searchsorted(stats["item_id"], ids)
    ev = EventBatch.from_rows([{"event_id": j, "ts": e.ts, "user_id": user, "item_id": e.item_id, "topic": e.topic,
                                "creator_id": e.creator_id, "type": EventType(e.type), "value": e.value} for j, e in enumerate(recorded)])
    spine = pa.table({"user_id": np.full(len(ids), user, np.int64), "item_id": ids, "topic": chunk["topic"][r].astype(np.int64),
                      "creator_id": chunk["creator_id"][r], "ts": np.full(len(ids), now, np.int64)})
    sess = session_values(kind, PitJoiner(session_sets(kind), ev).join(spine))
    ii = None
    if model.item_item is not None:  # the history: the user file's recent items, then this session's engagements
        engaged = [e.item_id for e in sorted(recorded, key=lambda e: e.ts) if e.type in (1, 2) and e.ts < now]
        hist = last_distinct(np.asarray(uf["recent"].tolist() + engaged, dtype=np.int64), model.item_item.history_len)
        ii = model.item_item.scores(hist, ids)
        assert np.isfinite(ii).all() and (ii != 0).any()
    X = device_matrix(kind, DeviceRows(user_emb, item_emb, stats["values"][srow], chunk["publish_ts"][r], chunk["duration_s"][r],
                                       np.full(len(ids), now, np.int64), sess, ids, np.zeros(len(ids), np.int64), ii))
    export_scores = device_session(model.int8_path).run(["score"], {"features": X})[0].reshape(-1)
    assert np.abs(export_scores - sdk_scores).max() <= 1e-5
    # the session features themselves: the SDK's log vs the feature store's join
    sdk_sess = client.session_features(ids, now)
    for j, c in enumerate(session_columns(kind)):
        np.testing.assert_allclose(sdk_sess[c], sess[:, j], rtol=0, atol=1e-9, err_msg=c)
    assert sess[:, session_columns(kind).index("session.user.impressions")].max() > 0  # the test saw real sessions
    client.close()


def test_bundle_embeddings_match_the_release(device) -> None:
    keys, bundle = device.keys, device.bundle
    payload = read_manifest(bundle / MANIFEST, keys.public_pem)
    chunk = read_npz(bundle / payload["items"]["chunks"][0])
    rt = ReleaseRuntime.load(load_release(device.release), rankers=())
    pos = np.searchsorted(chunk["item_id"], rt.vocab)
    assert (chunk["item_id"][pos] == rt.vocab).all()
    deq = dequantize_rows(chunk["embedding"][pos], chunk["scale"][pos])
    assert (np.abs(deq - rt.item_embeddings) <= chunk["scale"][pos][:, None] / 2 + 1e-6).all()


def test_delta_syncs_incrementally_and_erasure_reaches_the_device(device, tmp_path: Path) -> None:
    keys, data0, bundle0, release_dir = device.keys, device.data, device.bundle, device.release
    data, bundle = tmp_path / "data", tmp_path / "bundle"
    shutil.copytree(data0, data)
    shutil.copytree(bundle0, bundle)
    events = EventLog(data / "events").read()
    users = np.unique(events.user_id)
    active, erased = int(users[0]), int(users[1])
    with BackgroundCDN(bundle) as cdn:
        a = Client(cdn.url, tmp_path / "a", keys.public_pem, keys.token(active))
        e = Client(cdn.url, tmp_path / "e", keys.public_pem, keys.token(erased))
        full_a = a.sync()
        assert e.sync().user_file
        assert e.rank(erased).source == "user"
        old = read_manifest(bundle / MANIFEST, keys.public_pem)
        w = int(old["watermark_ms"])
        log = EventLog(data / "events")
        log.append(EventBatch.from_rows([{"event_id": 10**12 + i, "ts": w + i, "user_id": active, "item_id": int(events.item_id[i]),
                                          "topic": int(events.topic[i]), "type": EventType.PLAY, "value": 20.0} for i in range(3)]))
        log.delete_user(erased, reason="test erasure")
        export_delta(bundle, data, keys, release_dir=release_dir)
        inc_a, inc_e = a.sync(), e.sync()
        again = a.sync()
    assert inc_a.changed and inc_a.version > full_a.version
    assert inc_a.files_fetched < full_a.files_fetched and inc_a.bytes_fetched < full_a.bytes_fetched
    assert again.not_modified and again.files_fetched == 0
    assert inc_e.changed and e.rank(erased).source == "popular"  # the tombstone dropped the erased user's file
    assert not list((tmp_path / "e").rglob(f"*{keys.token(erased)}*"))
    a.close()
    e.close()
