"""Server test fixtures (the tiny release, `release_dir`, is in tests/conftest.py): factories to configure servers on free ports of 127.0.0.1."""
from __future__ import annotations

import shutil
import socket
import stat
from pathlib import Path
from typing import Iterator

import pytest

from server.app import BackgroundServer
from server.client import ParityClient
from server.config import ServerConfig

ADMIN_TOKEN = "test-admin-token"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_config(release: Path, data_dir: Path, **overrides) -> ServerConfig:
    base = dict(release=release, data_dir=data_dir, host="127.0.0.1", port=0, metrics_port=None, admin_token=ADMIN_TOKEN,
                cpu_threads=2, io_threads=4, drain_grace_s=5.0)
    base.update(overrides)
    return ServerConfig(**base)


def _writable_copy(src: Path, dst: Path) -> Path:
    """A copy of a (read-only) release folder whose files can be changed."""
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        if p.is_file():
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return dst


@pytest.fixture(scope="module")
def memory_server(release_dir: Path, small_sim: Path) -> Iterator[BackgroundServer]:
    """A server on the memory store, shared by a module's tests (they use distinct users)."""
    with BackgroundServer(_make_config(release_dir, small_sim, metrics_port=_free_port())) as s:
        yield s


@pytest.fixture
def client(memory_server: BackgroundServer) -> Iterator[ParityClient]:
    with ParityClient(f"127.0.0.1:{memory_server.port}", timeout_s=5.0, admin_token=ADMIN_TOKEN) as c:
        yield c


@pytest.fixture(scope="session")
def admin_token() -> str:
    return ADMIN_TOKEN


@pytest.fixture(scope="session")
def server_config():
    """server_config(release, data_dir, **overrides) -> ServerConfig for a test server (free port, token set)."""
    return _make_config


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a port nothing listens on (now)."""
    return _free_port


@pytest.fixture(scope="session")
def writable_copy():
    """writable_copy(src, dst) -> a copy of a read-only release folder whose files can be changed."""
    return _writable_copy
