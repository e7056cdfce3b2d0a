"""Sync: fetch only what changed, verify everything, and on any failure keep the last good bundle."""
from __future__ import annotations

import json

import pytest

from mobile_sdk import Client, NoBundle, SyncError

from bundle_factory import write_manifest
from conftest import NOW_MS, OTHER, USER, World, spec_v2

CTX = {"now_ms": NOW_MS}


def cached_files(world: World, cache: str = "device") -> dict[str, bytes]:
    root = world.root / cache / "files"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def device_paths(payload: dict, world: World, user_id: int = USER) -> set[str]:
    """What a device of user_id needs from a payload: model .ort, items, its bin and its user file."""
    tok = world.keys.token(user_id)
    paths = {payload["model"]["ort"], *payload["items"]["chunks"], payload["items"]["stats"], payload["items"]["lists"]}
    bin_path = payload["users"]["bins"].get(tok[: payload["users"]["prefix_len"]])
    if bin_path:
        paths.add(bin_path)
        entry = json.loads((world.origin / bin_path).read_bytes())["users"].get(tok)
        if entry:
            paths.add(entry["path"])
    return paths


def sizes(world: World, paths: set[str]) -> int:
    return sum((world.origin / p).stat().st_size for p in paths)


def snapshot(world: World, cache: str = "device") -> tuple[bytes, dict[str, bytes]]:
    return (world.root / cache / "state.json").read_bytes(), cached_files(world, cache)


def test_a_full_sync_fetches_every_file_the_device_needs_and_ranks_from_it(world):
    payload = json.loads(json.loads((world.origin / "manifest.json").read_bytes())["payload"])
    c = world.client()
    r = c.sync()
    need = device_paths(payload, world)
    assert (r.changed, r.version, r.not_modified, r.user_file) == (True, 1, False, "present")
    assert r.files_fetched == len(need) == 6 and r.bytes_fetched == sizes(world, need)
    assert set(cached_files(world)) == need  # not the .onnx, not other users' bins or files
    assert c.version == 1
    ranking = c.rank(USER, context=CTX)
    assert ranking.source == "user" and len(ranking) > 0


def test_an_incremental_sync_fetches_only_the_changed_files_and_drops_the_old_ones(world):
    c = world.client()
    c.sync()
    v1 = set(cached_files(world))
    payload = world.publish(spec_v2())
    r = c.sync()
    need = device_paths(payload, world)
    new = need - v1
    assert len(new) == 5  # the new chunk, stats, lists, USER's bin and USER's file; not the model, not chunk 1
    assert (r.changed, r.version, r.files_fetched, r.bytes_fetched) == (True, 2, len(new), sizes(world, new))
    assert set(cached_files(world)) == need  # the v1 stats, lists, bin and user file were collected
    assert {30, 31} <= set(c.rank(USER, context=CTX).item_ids)


def test_a_second_sync_of_the_same_manifest_is_a_304_and_fetches_nothing(world):
    c = world.client()
    c.sync()
    r = c.sync()
    assert (r.not_modified, r.changed, r.files_fetched, r.bytes_fetched, r.version) == (True, False, 0, 0, 1)


def test_a_file_tampered_on_the_server_is_refused_and_the_old_bundle_still_ranks(world):
    c = world.client()
    c.sync()
    before = snapshot(world)
    expected = c.rank(USER, context=CTX)
    payload = world.publish(spec_v2())
    chunk = world.origin / payload["items"]["chunks"][1]
    data = bytearray(chunk.read_bytes())
    data[-10] ^= 0xFF  # same size, other bytes
    chunk.write_bytes(bytes(data))
    with pytest.raises(SyncError, match="sha256"):
        c.sync()
    assert c.version == 1 and snapshot(world)[0] == before[0]
    assert {p: b for p, b in cached_files(world).items() if p in before[1]} == before[1]  # nothing v1 uses changed
    assert c.rank(USER, context=CTX) == expected
    assert Client(world.url, world.root / "device", world.keys.public_pem, world.keys.token(USER)).version == 1


def test_a_manifest_whose_payload_does_not_match_its_signature_is_refused(world):
    c = world.client()
    c.sync()
    payload = world.publish(spec_v2())
    write_manifest(world.origin, payload, world.keys, tamper_payload=True)
    with pytest.raises(SyncError, match="signature"):
        c.sync()
    assert c.version == 1


def test_a_device_with_another_public_key_refuses_the_bundle(world, other_keys):
    c = world.client(public_key=other_keys.pub_path)
    with pytest.raises(SyncError, match="key"):
        c.sync()
    with pytest.raises(NoBundle):
        c.rank(USER, context=CTX)


def test_a_manifest_signed_by_another_key_claiming_ours_is_refused(world, other_keys):
    c = world.client()
    c.sync()
    payload = world.publish(spec_v2())
    write_manifest(world.origin, payload, other_keys, key_id=world.keys.key_id)
    with pytest.raises(SyncError, match="signature"):
        c.sync()
    assert c.version == 1


def test_an_older_bundle_replayed_is_refused(world):
    old = (world.origin / "manifest.json").read_bytes()
    c = world.client()
    world.publish(spec_v2())
    c.sync()
    (world.origin / "manifest.json").write_bytes(old)
    with pytest.raises(SyncError, match="older"):
        c.sync()
    assert c.version == 2


def test_the_same_version_with_other_content_is_refused(world):
    c = world.client()
    c.sync()
    other = spec_v2()
    other.version = 1
    world.publish(other)
    with pytest.raises(SyncError, match="equals"):
        c.sync()
    assert c.rank(USER, context=CTX).item_ids and 30 not in c.rank(USER, context=CTX).item_ids


def test_malformed_json_is_refused(world):
    c = world.client()
    c.sync()
    (world.origin / "manifest.json").write_bytes(b'{"format": "parity-device-bundle", "payload": ')
    with pytest.raises(SyncError, match="JSON"):
        c.sync()
    assert c.version == 1


def test_a_truncated_download_is_refused_then_resumed_with_a_range_request(world):
    payload = world.publish(spec_v2())
    big = payload["model"]["ort"]
    seen: list[tuple[str, str | None]] = []
    cut = {"on": True}

    def truncating(app):
        def wrapped(environ, start_response):
            path = environ["PATH_INFO"].lstrip("/")
            seen.append((path, environ.get("HTTP_RANGE")))
            body = b"".join(app(environ, start_response))
            return [body[: len(body) // 2]] if cut["on"] and path == big else [body]
        return wrapped

    world.serve(wrap=truncating)
    c = world.client()
    with pytest.raises(SyncError, match="truncated"):
        c.sync()
    with pytest.raises(NoBundle):
        c.rank(USER, context=CTX)
    cut["on"] = False
    r = c.sync()
    size = (world.origin / big).stat().st_size
    assert (big, f"bytes={size // 2}-") in seen  # resumed where the cut left it
    assert r.version == 2 and r.bytes_fetched == sizes(world, device_paths(payload, world)) - size // 2


def test_a_server_that_drips_bytes_cannot_hold_a_sync_past_its_budget(world):
    """Each read arrives well within the socket timeout, but the whole sync has a budget: a
    slow-drip (or hostile) CDN ends in SyncError, and the bundle in use stays."""
    import time as _time

    c = world.client()
    c.sync()
    expected = c.rank(USER, context=CTX)
    payload = world.publish(spec_v2())
    big = payload["items"]["chunks"][-1]  # new in version 2: not in the device's cache
    assert (world.origin / big).stat().st_size > 64 * 12

    def dripping(app):
        def wrapped(environ, start_response):
            body = b"".join(app(environ, start_response))
            if environ["PATH_INFO"].lstrip("/") != big:
                return [body]

            def drip():
                for i in range(0, len(body), 64):
                    _time.sleep(0.05)
                    yield body[i:i + 64]
            return drip()
        return wrapped

    world.serve(wrap=dripping)
    slow = world.client(cache="device", sync_budget_s=0.3)
    t = _time.monotonic()
    with pytest.raises(SyncError, match="time budget"):
        slow.sync()
    assert _time.monotonic() - t < 3.0
    assert slow.version == 1 and slow.rank(USER, context=CTX) == expected


def test_server_down_raises_sync_error_and_the_device_ranks_offline(world):
    c = world.client()
    c.sync()
    expected = c.rank(USER, context=CTX)
    world.stop()
    with pytest.raises(SyncError):
        c.sync()
    assert c.rank(USER, context=CTX) == expected


def test_a_device_that_never_synced_raises_no_bundle(world):
    c = world.client(url="http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(NoBundle, match="not synced"):
        c.rank(USER, context=CTX)
    with pytest.raises(SyncError):
        c.sync()
    with pytest.raises(NoBundle):
        c.rank(USER, context=CTX)


def test_a_deleted_user_loses_the_user_file_and_gets_popular_items(world):
    c = world.client()
    c.sync()
    assert c.rank(USER, context=CTX).source == "user"
    tok = world.keys.token(USER)
    spec = spec_v2()
    del spec.users[USER]
    spec.deleted = [USER]
    world.publish(spec)
    r = c.sync()
    assert r.user_file == "deleted"
    assert not any(p.startswith(f"users/{tok}") for p in cached_files(world))
    ranking = c.rank(USER, context=CTX)
    assert ranking.source == "popular"
    assert set(ranking.item_ids) <= {13, 10, 12, 30, 31, 17}  # popular then newest (99 is not in the table)


def test_a_cold_start_loads_the_cached_bundle_without_network(world):
    c = world.client()
    c.sync()
    expected = c.rank(USER, context=CTX)
    world.stop()
    again = world.client(url="http://127.0.0.1:9")
    assert again.version == 1 and again.load_error is None
    assert again.rank(USER, context=CTX) == expected


def test_a_cold_start_refuses_a_damaged_cache(world):
    c = world.client()
    c.sync()
    blob = next(p for p in (world.root / "device" / "files").rglob("chunk.*"))
    data = bytearray(blob.read_bytes())
    data[-30] ^= 0xFF
    blob.write_bytes(bytes(data))
    again = world.client(url="http://127.0.0.1:9")
    assert again.version is None and "sha256" in again.load_error
    with pytest.raises(NoBundle, match="sha256"):
        again.rank(USER, context=CTX)


def test_a_damaged_cached_blob_is_fetched_again_by_the_next_sync(world):
    c = world.client()
    c.sync()
    blob = next(p for p in (world.root / "device" / "files").rglob("chunk.*"))
    good = blob.read_bytes()
    blob.write_bytes(b"x" * len(good))
    world.publish(spec_v2())
    r = c.sync()
    assert r.version == 2 and r.files_fetched == 6 and blob.read_bytes() == good


def test_another_token_on_the_same_bundle_gets_its_own_user_file(world):
    world.client().sync()
    c = world.client(OTHER, cache="device")  # same cache, other user: the cached bundle, without OTHER's file
    assert c.bundle.user_status == "not cached"
    r = c.sync()
    assert r.files_fetched >= 1 and c.bundle.user_status == "present"
    assert c.rank(OTHER, context=CTX).source == "user"


def test_a_device_without_a_token_ranks_popular_items(world):
    c = world.client(None, cache="anon")
    assert c.sync().user_file == "no token"
    assert c.rank(context=CTX).source == "popular"


def test_a_malformed_token_or_key_is_refused_at_construction(world, tmp_path):
    with pytest.raises(ValueError):
        Client(world.url, tmp_path / "c", world.keys.public_pem, "not-a-token")
    with pytest.raises(ValueError):
        Client(world.url, tmp_path / "c", b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    assert Client(world.url, tmp_path / "c", world.keys.pub_path).version is None


def test_a_replay_is_refused_even_when_the_cached_files_are_damaged(world):
    old = (world.origin / "manifest.json").read_bytes()
    world.publish(spec_v2())
    world.client().sync()
    blob = next(p for p in (world.root / "device" / "files").rglob("chunk.*"))
    blob.unlink()
    (world.origin / "manifest.json").write_bytes(old)
    again = world.client()
    assert again.version is None  # the cache is unusable ...
    with pytest.raises(SyncError, match="older"):  # ... but the version it had accepted still bounds replays
        again.sync()
