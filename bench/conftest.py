"""Session fixtures for the feature-store benchmarks: one simulated dataset, one private Redis.

Run from the repo root (`make bench`), so `bench` and `tests` import as top-level packages.
Redis benchmarks use a private redis-server on a free port (never 127.0.0.1:6379) and are
skipped, with the reason shown, when no redis-server binary is installed.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from features.datasets import DatasetInfo, events_dir
from features.definitions import FeatureSet
from features.eventlog import EventLog
from features.events import EventBatch
from features.repo import feature_sets
from bench.report import _cpu_model  # one definition of the machine description
from features.simulator import simulate
from tests.redis_server import RedisServer  # the tests' private-server helper (run from the repo root)

# The dataset every benchmark reads. 10k users over 14 days is ~0.96M events (seed 1), which
# the simulator writes in ~2 s; 20k users doubles it (~1.9M) and the whole run's time with it.
SIM_USERS = int(os.environ.get("PARITY_BENCH_USERS", "10000"))
SIM_ITEMS = 3000
SIM_DAYS = 14
SIM_SEED = 1


@dataclass(frozen=True)
class Dataset:
    dir: Path
    info: DatasetInfo
    events: EventBatch  # the whole log, sorted by (ts, event_id)
    sets: tuple[FeatureSet, ...]
    simulate_s: float
    read_s: float

    @property
    def now_ms(self) -> int:
        """"Now" for online reads: just after the newest event."""
        return int(self.events.ts.max()) + 1


_SESSION_INFO: dict = {}


def _say(config: pytest.Config, line: str) -> None:
    """Print past output capturing (a session fixture's print would be swallowed)."""
    tr = config.pluginmanager.getplugin("terminalreporter")
    capman = config.pluginmanager.getplugin("capturemanager")
    if tr is None:  # pragma: no cover
        print(line)
    elif capman is None:  # pragma: no cover
        tr.write_line(line)
    else:
        with capman.global_and_fixture_disabled():
            tr.write_line(line)


@pytest.fixture(scope="session")
def dataset(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    out = tmp_path_factory.mktemp("bench") / "sim"
    t0 = time.perf_counter()
    info = simulate(out, users=SIM_USERS, items=SIM_ITEMS, days=SIM_DAYS, seed=SIM_SEED)
    t1 = time.perf_counter()
    events = EventLog(events_dir(out)).read()
    t2 = time.perf_counter()
    if len(events) != info.n_events:
        raise AssertionError(f"event log holds {len(events)} events, simulator reported {info.n_events}")
    if not 500_000 <= len(events) <= 3_000_000:
        raise AssertionError(f"benchmark dataset has {len(events)} events; expected ~1M (check the simulator)")
    ds = Dataset(out, info, events, feature_sets("simulated", info.n_topics), t1 - t0, t2 - t1)
    _SESSION_INFO.update(
        users=SIM_USERS, items=SIM_ITEMS, days=SIM_DAYS, seed=SIM_SEED, events=len(events),
        simulate_s=round(ds.simulate_s, 3), read_s=round(ds.read_s, 3),
    )  # fmt: skip
    _say(
        request.config,
        f"\n[bench] simulated {len(events):,} events (users={SIM_USERS}, items={SIM_ITEMS}, days={SIM_DAYS}, "
        f"seed={SIM_SEED}) in {ds.simulate_s:.1f} s; EventLog.read {ds.read_s:.1f} s",
    )
    return ds


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found on PATH: Redis benchmarks skipped (apt-get install redis-server)")
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The private server's URL, emptied before each benchmark."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


# -- what goes into the JSON besides the timings -----------------------------------------
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["parity_cpu_model"] = _cpu_model()
    machine_info["parity_cores"] = os.cpu_count()
    try:
        machine_info["parity_cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        pass


def pytest_benchmark_generate_commit_info(config: pytest.Config) -> dict:
    """The commit from plain reads of .git/HEAD: the default runs `git describe --dirty`,
    which refreshes (writes) the index and can collide with a concurrent git command."""
    info: dict = {"id": None, "branch": None, "source": ".git/HEAD (read only)"}
    git = Path(__file__).resolve().parents[1] / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            info["branch"] = ref.rsplit("/", 1)[-1]
            if (git / ref).is_file():
                info["id"] = (git / ref).read_text().strip()
            elif (git / "packed-refs").is_file():
                for line in (git / "packed-refs").read_text().splitlines():
                    if line.endswith(" " + ref):
                        info["id"] = line.split()[0]
        else:
            info["id"] = head
    except OSError:
        pass
    return info


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    output_json["parity"] = {"dataset": dict(_SESSION_INFO), "command": "make bench"}
