"""The whole request path in process, without the network: `RecommenderService.recommend`
(response cache, feature read from the memory store, decode, retrieval, ranking,
post-processing) for the product configuration against the baseline one (torch fp32
teacher, exact numpy retrieval, no caches), on the bench dataset with a small release.

Users rotate through 3,000 ids (70 % known, 10 % new, 20 % heavy, as in the load tests), so
the 1 s response cache and 5 s feature cache hit about as often as under a steady load.
The per-stage means (the server's own Timer) are in each benchmark's details.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench.baseline_server import TORCH_TEACHER, register
from bench.latency import UserMix
from pipeline.train import train_release
from server.bootstrap import build_service
from server.config import ServerConfig
from server.validation import validate_recommend

N_USERS = 3000


@pytest.fixture(scope="module")
def release(dataset, tmp_path_factory):
    return train_release(dataset.dir, tmp_path_factory.mktemp("pipeline-release"), profile="small", seed=0).path


@pytest.fixture(scope="module")
def users(dataset):
    return [int(u) for u in UserMix.from_data_dir(dataset.dir).sample(N_USERS, seed=1)]


def _service(release, data_dir, **overrides):
    cfg = ServerConfig(release=release, data_dir=data_dir, host="127.0.0.1", port=0, metrics_port=None, **overrides)
    return build_service(cfg)


def _run(benchmark, svc, users, **extra):
    from parity_api.v1 import recommender_pb2 as pb

    loop = asyncio.new_event_loop()
    queries = [validate_recommend(pb.RecommendRequest(user_id=str(u), k=10, include_latency=True), svc.cfg) for u in users]
    stages: dict[str, list[float]] = {}
    i = iter(range(10**9))

    def one():
        out = loop.run_until_complete(svc.recommend(queries[next(i) % len(queries)]))
        for name, ms in out.latency:
            stages.setdefault(name, []).append(ms)
        return out

    # the steady state of a running server: each user's served-values records past their
    # interval were read from the state once and rewritten by the repair task (not started here)
    for q in queries:
        loop.run_until_complete(svc.recommend(q))
    loop.run_until_complete(svc.values_repair.drain())
    stages.clear()
    try:
        out = benchmark(one)
    finally:
        loop.close()
        svc.cpu.shutdown()
        svc.io.shutdown()
    assert len(out.items) == 10
    benchmark.extra_info.update(work=1, unit="requests", stage_mean_ms={k: round(float(np.mean(v)), 3) for k, v in sorted(stages.items())}, **extra)


@pytest.mark.benchmark(group="pipeline")
def test_pipeline_recommend_baseline(benchmark, release, dataset, users):
    register()
    svc = _service(release, dataset.dir, ranker=TORCH_TEACHER, retrieval="exact", response_cache_ttl_s=0.0, feature_cache_ttl_s=0.0,
                   item_frame_cache=False)
    _run(benchmark, svc, users, config="torch teacher, exact retrieval, no caches")


@pytest.mark.benchmark(group="pipeline")
def test_pipeline_recommend_parity(benchmark, release, dataset, users):
    _run(benchmark, _service(release, dataset.dir), users, baseline="test_pipeline_recommend_baseline",
         config="int8 student, ScaNN, caches (the product)")


@pytest.mark.benchmark(group="pipeline")
def test_pipeline_recommend_parity_no_caches(benchmark, release, dataset, users):
    svc = _service(release, dataset.dir, response_cache_ttl_s=0.0, feature_cache_ttl_s=0.0, item_frame_cache=False)
    _run(benchmark, svc, users, baseline="test_pipeline_recommend_baseline", config="int8 student, ScaNN, no caches")
