"""The CDN stand-in serves a bundle directory as a CDN would: ETags, 304, ranges, cache headers, nothing else."""
from __future__ import annotations

import hashlib
import http.client as httplib
import urllib.request
from pathlib import Path

import pytest
from werkzeug.test import Client as WsgiClient

from export.device.cdn import IMMUTABLE, BackgroundCDN, make_app

BLOB = bytes(range(256)) * 40
SHA = hashlib.sha256(BLOB).hexdigest()
CHUNK = f"items/chunk.{SHA}.npz"


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    (root / "items").mkdir(parents=True)
    (root / CHUNK).write_bytes(BLOB)
    (root / "manifest.json").write_bytes(b'{"format": "parity-device-bundle"}')
    (root / "items" / "notes.txt").write_bytes(b"not content-addressed")
    (root / ".secret").write_bytes(b"dot file")
    (tmp_path / f"outside.{SHA}.npz").write_bytes(BLOB)
    return root


@pytest.fixture
def http(bundle_dir: Path) -> WsgiClient:
    return WsgiClient(make_app(bundle_dir))


def test_a_content_addressed_file_is_served_with_its_sha256_as_etag_and_cached_forever(http):
    r = http.get(f"/{CHUNK}")
    assert r.status_code == 200 and r.data == BLOB
    assert r.headers["ETag"] == f'"{SHA}"'
    assert r.headers["Cache-Control"] == IMMUTABLE == "public, max-age=31536000, immutable"
    assert r.headers["Accept-Ranges"] == "bytes" and int(r.headers["Content-Length"]) == len(BLOB)


def test_if_none_match_with_the_etag_answers_304_without_a_body(http):
    r = http.get(f"/{CHUNK}", headers={"If-None-Match": f'"{SHA}"'})
    assert r.status_code == 304 and r.data == b""
    assert http.get(f"/{CHUNK}", headers={"If-None-Match": '"other"'}).status_code == 200


def test_a_range_request_answers_206_with_those_bytes(http):
    r = http.get(f"/{CHUNK}", headers={"Range": "bytes=100-"})
    assert r.status_code == 206 and r.data == BLOB[100:]
    assert r.headers["Content-Range"] == f"bytes 100-{len(BLOB) - 1}/{len(BLOB)}"
    assert http.get(f"/{CHUNK}", headers={"Range": "bytes=10-19"}).data == BLOB[10:20]
    assert http.get(f"/{CHUNK}", headers={"Range": f"bytes={len(BLOB) + 5}-"}).status_code == 416


def test_the_manifest_is_revalidated_every_time_and_its_etag_follows_its_bytes(http, bundle_dir):
    r = http.get("/manifest.json")
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-cache"
    etag = r.headers["ETag"]
    assert http.get("/manifest.json", headers={"If-None-Match": etag}).status_code == 304
    (bundle_dir / "manifest.json").write_bytes(b'{"format": "parity-device-bundle", "v": 2}')
    r2 = http.get("/manifest.json", headers={"If-None-Match": etag})
    assert r2.status_code == 200 and r2.headers["ETag"] != etag


@pytest.mark.parametrize("path", ["/", "/items", "/items/", "/items/notes.txt", "/.secret", "/nope.json",
                                  f"/items/chunk.{'0' * 64}.npz", f"/../outside.{SHA}.npz",
                                  f"/items/../../outside.{SHA}.npz", f"/%2e%2e/outside.{SHA}.npz",
                                  "/manifest.json/", "//etc/passwd"])
def test_anything_but_bundle_files_is_404(http, path):
    assert http.get(path).status_code == 404


def test_only_get_and_head_are_allowed(http):
    assert http.post(f"/{CHUNK}").status_code == 405
    r = http.head(f"/{CHUNK}")
    assert r.status_code == 200 and r.data == b"" and r.headers["ETag"] == f'"{SHA}"'


def test_a_symlink_out_of_the_bundle_is_not_followed(bundle_dir, http):
    (bundle_dir / "items" / f"link.{SHA}.npz").symlink_to(bundle_dir.parent / f"outside.{SHA}.npz")
    assert http.get(f"/items/link.{SHA}.npz").status_code == 404


def test_background_cdn_serves_over_real_http_and_refuses_traversal_on_the_wire(bundle_dir):
    with BackgroundCDN(bundle_dir) as cdn:
        with urllib.request.urlopen(f"{cdn.url}/{CHUNK}", timeout=5) as r:
            assert r.status == 200 and r.read() == BLOB
        req = urllib.request.Request(f"{cdn.url}/{CHUNK}", headers={"Range": "bytes=5-9"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 206 and r.read() == BLOB[5:10]
        conn = httplib.HTTPConnection("127.0.0.1", cdn.port, timeout=5)
        conn.request("GET", f"/../outside.{SHA}.npz")  # sent as is: no client-side normalisation
        assert conn.getresponse().status == 404
        conn.close()
