"""Fetch a bundle over HTTP (stdlib urllib): the manifest with If-None-Match, then only the
files the cache lacks, each verified (size, sha256) before it gets its content-addressed name;
a partial download resumes with a Range request. `run_sync` commits nothing unless every byte
verified: the caller's current bundle is untouched by any failure."""
from __future__ import annotations

import http.client
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from mobile_sdk import loader
from mobile_sdk.bundle import MANIFEST, FileRef, Manifest, PublicKey, check_bytes, parse_manifest
from mobile_sdk.errors import BundleError, SyncError
from mobile_sdk.loader import DeviceBundle
from mobile_sdk.store import State, Store

_CHUNK = 1 << 16
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError, OSError)


@dataclass(frozen=True)
class SyncResult:
    changed: bool  # a new bundle is in use
    version: int  # the version in use after the sync
    files_fetched: int
    bytes_fetched: int
    seconds: float
    not_modified: bool  # the server answered 304
    user_file: str  # present, absent, deleted, no token


def _url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + "/" + urllib.parse.quote(path)


def _open(req: urllib.request.Request, timeout_s: float):
    try:
        return urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return exc
        raise SyncError(f"GET {req.full_url}: HTTP {exc.code}") from None
    except _NETWORK_ERRORS as exc:
        raise SyncError(f"GET {req.full_url}: {type(exc).__name__}: {exc}") from None


def get_manifest(base_url: str, etag: str | None, timeout_s: float, max_bytes: int) -> tuple[bytes | None, str | None]:
    """(body, etag); body None when the server answered 304 Not Modified."""
    req = urllib.request.Request(_url(base_url, MANIFEST), headers={"If-None-Match": etag} if etag else {})
    resp = _open(req, timeout_s)
    with resp:
        if resp.status == 304:
            return None, etag
        try:
            body = resp.read(max_bytes + 1)
        except _NETWORK_ERRORS as exc:
            raise SyncError(f"reading {MANIFEST}: {type(exc).__name__}: {exc}") from None
        if len(body) > max_bytes:
            raise SyncError(f"{MANIFEST} is larger than {max_bytes} bytes")
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) != len(body):
            raise SyncError(f"{MANIFEST} truncated: {len(body)} of {length} bytes")
        return body, resp.headers.get("ETag")


def download(base_url: str, store: Store, ref: FileRef, timeout_s: float, deadline: float = math.inf) -> tuple[bytes, int]:
    """Fetch `ref` into the cache; returns (its verified bytes, bytes transferred). Resumes a partial file.
    `deadline` (time.monotonic()): a server that drips bytes cannot hold a sync past it
    (`timeout_s` bounds each socket read only); what arrived is kept for a Range request."""
    part = store.partial_for(ref.sha256)
    have = part.stat().st_size if part.exists() else 0
    if have >= ref.bytes:
        part.unlink(missing_ok=True)
        have = 0
    req = urllib.request.Request(_url(base_url, ref.path), headers={"Range": f"bytes={have}-"} if have else {})
    resp = _open(req, timeout_s)
    got = 0
    with resp:
        if resp.status == 206 and not (resp.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
            raise SyncError(f"{ref.path}: the server answered a Range request with {resp.headers.get('Content-Range')!r}")
        if resp.status == 200:
            have = 0
        elif resp.status != 206:
            raise SyncError(f"{ref.path}: HTTP {resp.status}")
        with open(part, "r+b" if have else "wb") as f:
            f.seek(have)
            f.truncate()
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except _NETWORK_ERRORS as exc:
                    raise SyncError(f"{ref.path}: download broke after {have + got} bytes: {exc}") from None
                if not chunk:
                    break
                if time.monotonic() > deadline:
                    f.write(chunk)
                    raise SyncError(f"{ref.path}: the sync's time budget ran out after {have + got + len(chunk)} of {ref.bytes} bytes")
                got += len(chunk)
                if have + got > ref.bytes:
                    part.unlink(missing_ok=True)
                    raise SyncError(f"{ref.path}: more than the {ref.bytes} bytes the manifest says")
                f.write(chunk)
    if have + got < ref.bytes:  # kept for a Range request next time
        raise SyncError(f"{ref.path}: truncated download, {have + got} of {ref.bytes} bytes")
    data = part.read_bytes()
    try:
        check_bytes(data, ref)
    except BundleError as exc:
        part.unlink(missing_ok=True)
        raise SyncError(f"verification failed: {exc}") from None
    store.commit_blob(part, ref.path)
    return data, got


class _Fetcher:
    """A loader.Reader that takes verified bytes from the cache, else downloads; counts downloads."""

    def __init__(self, base_url: str, store: Store, timeout_s: float, deadline: float = math.inf) -> None:
        self.base_url, self.store, self.timeout_s, self.deadline = base_url, store, timeout_s, deadline
        self.files = 0
        self.bytes = 0
        self._seen: dict[str, bytes] = {}

    def __call__(self, ref: FileRef) -> bytes:
        if ref.path in self._seen:
            return self._seen[ref.path]
        data = self.store.read_blob(ref.path)
        if data is not None:
            try:
                check_bytes(data, ref)
            except BundleError:
                data = None  # a damaged cached copy: fetched again below
        if data is None:
            data, n = download(self.base_url, self.store, ref, self.timeout_s, self.deadline)
            self.files += 1
            self.bytes += n
        self._seen[ref.path] = data
        return data


def cache_reader(store: Store) -> loader.Reader:
    """Cold start: verified bytes from the cache; a missing user file is None, anything wrong raises."""
    def read(ref: FileRef) -> bytes | None:
        data = store.read_blob(ref.path)
        return None if data is None else check_bytes(data, ref)
    return read


def run_sync(base_url: str, store: Store, key: PublicKey, token: str | None, current: DeviceBundle | None,
             floor: Manifest | None, etag: str | None, timeout_s: float,
             max_manifest_bytes: int, budget_s: float = math.inf) -> tuple[SyncResult, DeviceBundle | None, str | None]:
    """One sync. `floor`: the newest verified manifest this device has accepted (the current
    bundle's, or a cached one whose files failed to load); an older one is a replay.
    Returns (result, the new bundle or None when the current one stays, the manifest's ETag)."""
    t0 = time.monotonic()
    conditional = current is not None and current.user_status != loader.USER_NOT_CACHED
    raw, new_etag = get_manifest(base_url, etag if conditional else None, timeout_s, max_manifest_bytes)

    def result(changed: bool, version: int, fetcher: _Fetcher | None, not_modified: bool, user: str) -> SyncResult:
        return SyncResult(changed, version, fetcher.files if fetcher else 0, fetcher.bytes if fetcher else 0,
                          time.monotonic() - t0, not_modified, user)

    if raw is None:
        return result(False, current.version, None, True, current.user_status), None, etag
    try:
        man = parse_manifest(raw, key)
    except BundleError as exc:
        raise SyncError(f"manifest refused: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes
        raise SyncError(f"manifest refused: {type(exc).__name__}: {exc}") from None
    if floor is not None:
        cur = floor
        if man.version < cur.version:
            raise SyncError(f"manifest version {man.version} is older than the version in use {cur.version} (replay?)")
        if man.version == cur.version and man.payload != cur.payload:
            raise SyncError(f"manifest version {man.version} equals the version in use but its content differs")
    fetcher = _Fetcher(base_url, store, timeout_s, t0 + budget_s)
    try:
        for ref in loader.device_files(man, token):
            fetcher(ref)
        bundle = loader.load(man, token, fetcher)
    except BundleError as exc:
        raise SyncError(f"bundle refused: {exc}") from None
    except SyncError:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: whatever breaks, the current bundle stays in use
        raise SyncError(f"bundle refused: {type(exc).__name__}: {exc}") from None
    same = current is not None and man.payload == current.manifest.payload and bundle.user_ref == current.user_ref
    store.write_state(State(raw, new_etag))
    store.gc(set(bundle.paths))
    return result(not same, man.version, fetcher, False, bundle.user_status), bundle, new_etag
