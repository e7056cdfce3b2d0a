"""Releases are immutable, and a corrupted or partial release folder is refused clearly."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from export.reference import column_references, psi
from export.release import MANIFEST, ReleaseError, list_releases, load_release, write_release


def _manifest(rid: str = "r1") -> dict:
    return {
        "release_id": rid, "created_at_ms": 1, "dataset": {"kind": "simulated"}, "feature_sets": {"user_activity": {"version": "v1"}},
        "ranker_inputs": {"columns": ["a"]}, "training_data": {"fingerprint": "f"}, "config": {}, "seed": 0, "libraries": {}, "metrics": {}, "models": {},
    }


@pytest.fixture
def release(tmp_path):
    staged = tmp_path / "staged"
    (staged / "rankers").mkdir(parents=True)
    (staged / "rankers" / "student.onnx").write_bytes(b"model-bytes")
    (staged / "popularity.json").write_text("[1, 2, 3]")
    return write_release(tmp_path / "releases", staged, _manifest())


def _writable(path):
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_a_written_release_loads_lists_and_is_read_only(release, tmp_path):
    again = load_release(release.path)
    assert again.release_id == "r1" and set(again.manifest["files"]) == {"rankers/student.onnx", "popularity.json"}
    assert [r.release_id for r in list_releases(tmp_path / "releases")] == ["r1"]
    assert not (release.path / "popularity.json").stat().st_mode & stat.S_IWUSR
    assert release.feature_set_versions == {"user_activity": "v1"}


def test_releases_are_immutable(release, tmp_path):
    staged = tmp_path / "s2"
    staged.mkdir()
    (staged / "x").write_text("y")
    with pytest.raises(ReleaseError, match="immutable"):
        write_release(tmp_path / "releases", staged, _manifest())


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (_writable(p / "popularity.json"), (p / "popularity.json").write_text("[3, 2, 1]")), "sha256"),
        (lambda p: (_writable(p / "rankers/student.onnx"), (p / "rankers/student.onnx").write_bytes(b"model")), "truncated"),
        (lambda p: (p / "rankers/student.onnx").unlink(), "files missing"),
        (lambda p: (p / "extra.bin").write_bytes(b"?"), "unexpected files"),
        (lambda p: (_writable(p / MANIFEST), (p / MANIFEST).write_text("{not json")), "not valid JSON"),
        (lambda p: (_writable(p / MANIFEST), (p / MANIFEST).write_text(json.dumps({"release_id": "r1"}))), "lacks"),
        (lambda p: (p / MANIFEST).unlink(), "partial"),
    ],
)
def test_corrupted_or_partial_releases_are_refused_with_the_reason(release, damage, message):
    release.path.chmod(0o755)
    damage(release.path)
    with pytest.raises(ReleaseError, match=message):
        load_release(release.path)


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(ReleaseError, match="no such folder"):
        load_release(tmp_path / "nope")


def test_psi_is_near_zero_for_the_same_distribution_and_large_under_shift():
    rng = np.random.default_rng(0)
    ref = column_references(rng.normal(size=(5000, 1)), ["x"])["x"]
    assert psi(ref, rng.normal(size=5000)) < 0.02
    assert psi(ref, rng.normal(loc=1.5, size=5000)) > 0.5
