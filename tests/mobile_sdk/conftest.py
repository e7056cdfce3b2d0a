"""A world for SDK tests: signed bundles written by bundle_factory into an origin directory,
served by the CDN stand-in (export/device/cdn.py) on a free port."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from export.device.cdn import BackgroundCDN
from mobile_sdk import Client

from bundle_factory import BundleSpec, Keys, UserSpec, item_chunk, make_keys, write_bundle

NOW_MS = 1_700_000_000_000
USER, OTHER, STRANGER = 1, 2, 3  # STRANGER has no user file


def chunk_v1() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    ids = [10, 11, 12, 13, 14, 15, 16, 17, 21, 20]
    emb = rng.normal(size=(len(ids), 4)).astype(np.float32)
    emb[9] = emb[8]  # 21 and 20 are twins: equal scores, ties by id
    emb[7] = 0.0  # an all-zero row quantises with scale 1
    return item_chunk(ids, emb, topics=[0, 0, 1, 1, 2, 2, -1, 3, 4, 4], creators=[100, 101, 100, 102, 103, 101, -1, 104, 105, 105],
                      publish_ts=[NOW_MS - 3_600_000 * h for h in (1, 2, 3, 4, 5, 6, 7)] + [0] + [NOW_MS - 9 * 3_600_000] * 2,
                      duration_s=[30, 45, 0, 60, 15, 20, 25, 35, 40, 40])


def spec_v1() -> BundleSpec:
    stats = {i: [0.1 * (i % 7), float(i)] for i in (10, 11, 12, 13, 14, 15, 16)} | {20: [0.3, 5.0], 21: [0.3, 5.0]}
    return BundleSpec(
        version=1, chunks=[chunk_v1()], stats=stats, popular=[13, 10, 12, 99], newest=[17, 13, 16],
        users={USER: UserSpec([0.5, -0.25, 1.0, 0.0], candidates=[10, 11, 12, 13, 14, 15, 16, 17, 20, 21, 99], recent=[11]),
               OTHER: UserSpec([-1.0, 0.5, 0.0, 0.25], candidates=[12, 14, 16])})


def spec_v2() -> BundleSpec:
    """A delta: one new item chunk, new stats and lists, USER's file changed, OTHER's unchanged."""
    s = copy.deepcopy(spec_v1())
    s.version, s.previous_version = 2, 1
    s.chunks.append(item_chunk([30, 31], [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]], topics=[0, 5], creators=[100, 106],
                               publish_ts=[NOW_MS - 600_000, NOW_MS - 1_200_000], duration_s=[12, 0]))
    s.stats |= {30: [0.9, 1.0], 31: [0.2, 2.0]}
    s.newest = [30, 31, 17]
    s.users[USER] = UserSpec([0.5, -0.25, 1.0, 0.0], candidates=[30, 31, 10, 12, 13], recent=[11])
    return s


class World:
    def __init__(self, root: Path, keys: Keys) -> None:
        self.root = root
        self.keys = keys
        self.origin = root / "origin"
        self.cdn: BackgroundCDN | None = None
        self._clients: list[Client] = []

    def publish(self, spec: BundleSpec, **kw) -> dict:
        return write_bundle(self.origin, self.keys, spec, **kw)

    def serve(self, wrap=None) -> BackgroundCDN:
        self.stop()
        self.cdn = BackgroundCDN(self.origin, wrap=wrap).start()
        return self.cdn

    def stop(self) -> None:
        if self.cdn is not None:
            self.cdn.stop()
            self.cdn = None

    @property
    def url(self) -> str:
        assert self.cdn is not None
        return self.cdn.url

    def client(self, user_id: int | None = USER, cache: str = "device", *, url: str | None = None, **kw) -> Client:
        c = Client(url or self.url, self.root / cache, kw.pop("public_key", self.keys.public_pem),
                   None if user_id is None else self.keys.token(user_id), timeout_s=kw.pop("timeout_s", 5.0), **kw)
        self._clients.append(c)
        return c

    def close(self) -> None:
        for c in self._clients:
            c.close()
        self.stop()


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"), seed=0)


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("other-keys"), seed=1)


@pytest.fixture
def world(tmp_path: Path, keys: Keys) -> Iterator[World]:
    """Version 1 published and served."""
    w = World(tmp_path, keys)
    w.publish(spec_v1())
    w.serve()
    try:
        yield w
    finally:
        w.close()
