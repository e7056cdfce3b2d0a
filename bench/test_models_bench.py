"""Model benchmarks: training time per profile, and scoring 500 candidates with the torch
teacher (baseline), the ONNX Runtime teacher, the fp32 student and the int8 student.

Training runs inside the benchmark (one round: it takes minutes); the ranking benchmarks
reuse the default-profile models it produced, so torch and ONNX score the same weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export.runtime import ReleaseRuntime
from features.simulator import simulate
from pipeline.train import train_release
from models.ranker import predict

CANDIDATES = 500
_trained: dict = {}


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "sim"
    simulate(d)  # the product's default data: 2,000 users, 500 items, 14 days, seed 0
    return d


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "tiny"
    simulate(d, users=300, items=80, days=5, seed=1)
    return d


def _train(data, root, profile):
    keep: dict = {}
    rel = train_release(data, root, profile=profile, seed=0, keep=keep)
    return rel, keep


@pytest.mark.benchmark(group="training")
def test_train_tiny_profile(benchmark, tiny_data, tmp_path):
    rel, keep = benchmark.pedantic(_train, args=(tiny_data, tmp_path, "tiny"), rounds=1, iterations=1)
    benchmark.extra_info.update(rows=len(keep["data"].train), steps_s=keep["timings"], release=rel.release_id)


@pytest.mark.benchmark(group="training")
def test_train_default_profile(benchmark, default_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("default-release")
    rel, keep = benchmark.pedantic(_train, args=(default_data, root, "default"), rounds=1, iterations=1)
    _trained.update(release=rel, **keep)
    benchmark.extra_info.update(rows=len(keep["data"].train), steps_s=keep["timings"], release=rel.release_id)


@pytest.fixture(scope="module")
def models(default_data, tmp_path_factory):
    if "release" not in _trained:  # the training benchmark was deselected
        rel, keep = _train(default_data, tmp_path_factory.mktemp("default-release"), "default")
        _trained.update(release=rel, **keep)
    rt = ReleaseRuntime.load(_trained["release"])
    X = np.ascontiguousarray(_trained["data"].test.X[:CANDIDATES])
    torch.set_num_threads(1)  # ONNX Runtime sessions run one intra-op thread too
    return rt, X


def _rank(benchmark, fn, **extra):
    benchmark.extra_info.update(work=CANDIDATES, unit="candidates", **extra)
    out = benchmark(fn)
    assert out.shape == (CANDIDATES,) and np.isfinite(out).all()


@pytest.mark.benchmark(group="ranking")
def test_rank_torch_teacher(benchmark, models):
    rt, X = models
    _rank(benchmark, lambda: predict(_trained["teacher"], X))


@pytest.mark.benchmark(group="ranking")
def test_rank_ort_teacher_fp32(benchmark, models):
    rt, X = models
    _rank(benchmark, lambda: rt.score(X, "teacher_fp32"), baseline="test_rank_torch_teacher")


@pytest.mark.benchmark(group="ranking")
def test_rank_ort_student_fp32(benchmark, models):
    rt, X = models
    _rank(benchmark, lambda: rt.score(X, "student_fp32"), baseline="test_rank_torch_teacher")


@pytest.mark.benchmark(group="ranking")
def test_rank_ort_student_int8(benchmark, models):
    rt, X = models
    _rank(benchmark, lambda: rt.score(X, "student_int8"), baseline="test_rank_torch_teacher",
          bytes_int8=rt.release.manifest["files"]["rankers/student_int8.onnx"]["bytes"],
          bytes_teacher=rt.release.manifest["files"]["rankers/teacher_fp32.onnx"]["bytes"])
