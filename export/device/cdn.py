"""The CDN stand-in: serves a bundle directory as a CDN would (BUNDLE_FORMAT.md "Layout").

- ETag on every file (the sha256 in the name for content-addressed files, the sha256 of the
  bytes for manifest.json); If-None-Match -> 304; Range -> 206 (werkzeug's send_file).
- Cache-Control: `public, max-age=31536000, immutable` for names holding a 64-hex sha256,
  `no-cache` for manifest.json.
- 404 for anything else: no directory listing, no dot-files, nothing outside the directory.

`BackgroundCDN(bundle_dir)` runs it on a free port in a thread (tests, the demo); `wrap` lets
a test put a fault-injecting WSGI middleware in front of the app.
"""
from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path
from typing import Callable

from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.utils import send_file
from werkzeug.wrappers import Request

MANIFEST = "manifest.json"
IMMUTABLE = "public, max-age=31536000, immutable"
NO_CACHE = "no-cache"
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SHA = re.compile(r"(?:^|\.)([0-9a-f]{64})(?:\.|$)")
_MIME = {".json": "application/json", ".npz": "application/octet-stream", ".onnx": "application/octet-stream",
         ".ort": "application/octet-stream"}


def _resolve(root: Path, rel: str) -> tuple[Path, str] | None:
    """(file, etag) for a servable path, else None."""
    parts = rel.split("/")
    if not all(_SEGMENT.fullmatch(p) and ".." not in p for p in parts):
        return None
    if rel != MANIFEST and not _SHA.search(parts[-1]):
        return None
    path = (root / rel).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    if rel == MANIFEST:
        return path, hashlib.sha256(path.read_bytes()).hexdigest()
    return path, _SHA.search(parts[-1]).group(1)


def make_app(bundle_dir: str | Path) -> Callable:
    root = Path(bundle_dir).resolve()

    def app(environ, start_response):
        request = Request(environ)
        try:
            if request.method not in ("GET", "HEAD"):
                raise MethodNotAllowed(valid_methods=["GET", "HEAD"])
            found = _resolve(root, request.path.lstrip("/"))
            if found is None:
                raise NotFound()
            path, etag = found
            response = send_file(path, environ, mimetype=_MIME.get(path.suffix, "application/octet-stream"),
                                 conditional=True, etag=etag)
            response.headers["Cache-Control"] = NO_CACHE if path.name == MANIFEST else IMMUTABLE
        except HTTPException as exc:
            response = exc.get_response(environ)
        return response(environ, start_response)

    return app


class _QuietHandler(WSGIRequestHandler):
    """No access log line per request: the stand-in runs inside tests, the demo and benchmarks."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class BackgroundCDN:
    """`with BackgroundCDN(bundle_dir) as cdn: cdn.url` — a threaded werkzeug server in a daemon thread."""

    def __init__(self, bundle_dir: str | Path, port: int = 0, host: str = "127.0.0.1",
                 wrap: Callable[[Callable], Callable] | None = None) -> None:
        app = make_app(bundle_dir)
        self._server = make_server(host, port, wrap(app) if wrap else app, threaded=True, request_handler=_QuietHandler)
        self.host = host
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="parity-cdn",
                                        daemon=True)
        self._started = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "BackgroundCDN":
        self._thread.start()
        self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            self._server.shutdown()
            self._started = False
        self._server.server_close()

    def __enter__(self) -> "BackgroundCDN":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_bundle(bundle_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (`parity export serve`)."""
    server = make_server(host, port, make_app(bundle_dir), threaded=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
