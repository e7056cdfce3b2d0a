"""Shared fixtures. Redis tests use a private server started once per session, never the
shared one on 127.0.0.1:6379."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from features.online.base import OnlineStore
from redis_server import RedisClusterServers, RedisServer


class ManualClock:
    """A wall clock tests move by hand, so TTL tests never sleep (MemoryStore(clock=...))."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the whole session (skips or fails if not installed)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the private server, emptied before each test so tests cannot see each other."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """One private Redis Cluster (3 masters, 3 replicas) for the whole session, started only
    when a test asks for it (skips or fails like redis_server if redis-server is missing)."""
    with RedisClusterServers() as cluster:
        yield cluster


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis), pytest.param("cluster", marks=pytest.mark.redis)])
def online_store(request: pytest.FixtureRequest) -> Iterator[OnlineStore]:
    """A fresh store of each backend under a namespace unique to this test.

    The memory store runs on a ManualClock reachable as `store.clock` (it has `.advance`).
    "cluster" is a RedisStore on the session's 3+3 Redis Cluster (not flushed between tests:
    the namespace keeps tests apart; a test that failed over a master leaves it healthy).
    """
    namespace = f"t{uuid.uuid4().hex[:12]}"
    if request.param == "memory":
        from features.online.memory import MemoryStore

        store = MemoryStore(namespace, clock=ManualClock())
    elif request.param == "cluster":
        from features.online.redis_store import RedisStore

        store = RedisStore(request.getfixturevalue("redis_cluster").url, namespace=namespace)
    else:
        from features.online.redis_store import RedisStore

        store = RedisStore(request.getfixturevalue("redis_url"), namespace=namespace)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def movielens_dir() -> Path:
    """MovieLens 100K directory (env PARITY_MOVIELENS, default ../shared/data/ml-100k)."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"
    path = Path(os.environ.get("PARITY_MOVIELENS", str(default)))
    if not (path / "u.data").is_file():
        reason = f"MovieLens 100K not found: {path / 'u.data'} is missing (set PARITY_MOVIELENS)"
        if os.environ.get("PARITY_REQUIRE_MOVIELENS") == "1":
            pytest.fail(reason + " and PARITY_REQUIRE_MOVIELENS=1", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def small_sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated data dir (read-only for tests: copy it before changing it)."""
    from features.simulator import simulate

    out = tmp_path_factory.mktemp("sim") / "data"
    simulate(out, users=150, items=60, days=4, seed=3)
    return out


@pytest.fixture(scope="session")
def release_dir(small_sim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ONE tiny release per session, trained on `small_sim` (read-only: copy it before changing it). It reads
    the trend inputs whatever its validation lists would choose, so the serving tests cover every input."""
    from pipeline.train import train_release  # torch lives here, in the test process only

    return train_release(small_sim, tmp_path_factory.mktemp("releases"), profile="tiny", seed=0, overrides={"trend_features": "on"}).path


@pytest.fixture
def sim_copy(small_sim: Path, tmp_path: Path) -> Path:
    """A private copy of the small simulated data dir, free to change."""
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(small_sim, dst)
    return dst
