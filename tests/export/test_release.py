"""Releases are immutable, and a corrupted or partial release folder is refused clearly."""
from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.reference import column_references, psi
from export.release import MANIFEST, ReleaseError, list_releases, load_release, scan_releases, write_release


def _manifest(rid: str = "r1") -> dict:
    return {
        "release_id": rid, "created_at_ms": 1, "dataset": {"kind": "simulated"}, "feature_sets": {"user_activity": {"version": "v1"}},
        "ranker_inputs": {"user_set": "user_activity", "item_set": "user_activity", "pair_sets": [], "affinity": "user_activity.x", "columns": ["a"]},
        "training_data": {"fingerprint": "f"}, "config": {}, "seed": 0, "libraries": {}, "metrics": {}, "models": {},
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


# ------------------------------------------------------------------ a malformed manifest is refused, never a crash

LONG = "x" * 4096


def _rewrite_manifest(path, change):
    """Apply ``change`` to the folder's parsed manifest (or replace its text, for a str) and write it back."""
    path.chmod(0o755)
    mp = path / MANIFEST
    _writable(mp)
    if isinstance(change, (str, bytes)):
        mp.write_bytes(change.encode() if isinstance(change, str) else change)
        return
    m = json.loads(mp.read_text())
    change(m)
    mp.write_text(json.dumps(m))


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _file_entry(rel, meta=None):
    return lambda m: m["files"].__setitem__(rel, meta or {"sha256": "0" * 64, "bytes": 1})


@pytest.mark.parametrize("change, message", [
    (_set("files", "x"), "files must be an object, not a string 'x'"),
    (_set("feature_sets", []), "feature_sets must be an object, not a list"),
    (_set("created_at_ms", "yesterday"), "created_at_ms must be a non-negative integer"),
    (_set("created_at_ms", True), "created_at_ms must be a non-negative integer"),
    (_set("seed", "0"), "seed must be an integer"),
    (_set("format_version", "1"), "format_version '1' is not 1"),
    (_set("release_id", 5), "release_id must be a string"),
    (_set("release_id", "../r1"), "is not a safe folder name"),
    (_set("release_id", LONG), "is not a safe folder name"),
    (_set("dataset", {"kind": 3}), "dataset.kind must be a string"),
    (_set("feature_sets", {"user_activity": "v1"}), r"feature_sets\['user_activity'\] must be an object with a version string"),
    (_set("feature_sets", {"user_activity": {"version": 3}}), "with a version string"),
    (_set("ranker_inputs", {"columns": ["a"]}), "ranker_inputs.user_set must be a string, not null"),
    (lambda m: m["ranker_inputs"].__setitem__("pair_sets", [["user_topic"]]), "ranker_inputs.pair_sets must be a list of"),
    (lambda m: m["ranker_inputs"].__setitem__("columns", "abc"), "ranker_inputs.columns must be a non-empty list of strings"),
    (_file_entry(LONG), "is 4096 characters long"),
    (_file_entry("../outside.bin"), "not a plain relative path"),
    (_file_entry("rankers/../../outside.bin"), "not a plain relative path"),
    (_file_entry("/etc/passwd"), "is an absolute path"),
    (_file_entry("a\x00b"), "NUL byte"),
    (_file_entry("popularity.json", "x"), "must be an object with sha256 and bytes"),
    (_file_entry("popularity.json", {"sha256": "nothex", "bytes": 9}), "sha256 must be 64 lowercase hex digits"),
    (_file_entry("popularity.json", {"sha256": "0" * 64, "bytes": -1}), "bytes must be a non-negative integer"),
    (_set("models", {"student": "rankers/missing.onnx"}), r"models\['student'\] must name a file the release lists"),
    (_set("retrieval", [1, 2]), "retrieval must be an object"),
    ("[1, 2, 3]", "must be an object, not a list"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ('{"n": ' + "9" * 5000 + "}", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),  # not UTF-8
])
def test_a_manifest_with_wrong_field_types_is_refused_with_the_reason(release, change, message):
    _rewrite_manifest(release.path, change)
    with pytest.raises(ReleaseError, match=message) as e:
        load_release(release.path)
    assert LONG not in str(e.value) and len(str(e.value)) < 400  # echoed values are clipped
    assert e.value.reason in str(e.value)


def test_a_file_path_a_4kb_path_and_a_nul_byte_are_refused_as_release_errors(release, tmp_path):
    with pytest.raises(ReleaseError, match="is a file, not a release folder"):
        load_release(release.path / "popularity.json")
    with pytest.raises(ReleaseError, match="cannot be opened") as e:
        load_release(tmp_path / ("d" * 4096))
    assert len(str(e.value)) < 300
    with pytest.raises(ReleaseError, match="cannot be opened"):
        load_release("/".join(["d" * 200] * 30))  # each part fine, the whole over PATH_MAX
    with pytest.raises(ReleaseError, match="NUL byte"):
        load_release(str(release.path) + "\x00x")
    with pytest.raises(ReleaseError, match="must be a string or path"):
        load_release(None)


def test_an_unreadable_manifest_is_a_release_error(release):
    # As root no permission bit stops a read; /proc/self/mem is a regular file whose read fails (EIO).
    release.path.chmod(0o755)
    (release.path / MANIFEST).unlink()
    (release.path / MANIFEST).symlink_to("/proc/self/mem")
    with pytest.raises(ReleaseError, match=f"{MANIFEST} cannot be read"):
        load_release(release.path)
    (release.path / MANIFEST).unlink()
    (release.path / MANIFEST).mkdir()
    with pytest.raises(ReleaseError, match="is not a regular file"):
        load_release(release.path)


def test_a_release_under_another_folder_name_loads_by_path_but_not_by_id(release, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(release.path, copy)
    assert load_release(copy).release_id == "r1"  # a server handed this path serves the same release
    with pytest.raises(ReleaseError, match="the folder is named 'copy' but holds release 'r1'"):
        load_release(copy, require_folder_name=True)


def test_write_release_refuses_an_id_that_is_not_a_folder_name(tmp_path):
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "x").write_text("y")
    with pytest.raises(ReleaseError, match="not a safe folder name"):
        write_release(tmp_path / "releases", staged, _manifest("../escaped"))
    assert not (tmp_path / "escaped").exists()


# ------------------------------------------------------------------ listing reports broken folders


def _releases_root_with_broken_folders(release, tmp_path):
    root = release.path.parent
    bad = root / "bad-types"
    shutil.copytree(release.path, bad)
    _rewrite_manifest(bad, lambda m: (m.update(files="x", release_id="bad-types")))
    long_path = root / "long-path"
    shutil.copytree(release.path, long_path)
    _rewrite_manifest(long_path, lambda m: (m.update(release_id="long-path"), m["files"].__setitem__(LONG, {"sha256": "0" * 64, "bytes": 1})))
    shutil.copytree(release.path, root / "renamed")
    (root / "empty").mkdir()
    (root / ".tmp-r2-abc").mkdir()  # a release being written: not listed at all
    (root / "notes.txt").write_text("not a release")
    older = root / "r0"
    shutil.copytree(release.path, older)
    _rewrite_manifest(older, lambda m: m.update(release_id="r0", created_at_ms=0, config={"profile": 7}, metrics={"ranking_test": "x"}))
    return root


def test_scan_releases_keeps_valid_ones_and_reports_each_broken_folder(release, tmp_path):
    root = _releases_root_with_broken_folders(release, tmp_path)
    scan = scan_releases(root)
    assert [r.release_id for r in scan.valid] == ["r1", "r0"]  # newest first
    reasons = {b.path.name: b.reason for b in scan.broken}
    assert set(reasons) == {"bad-types", "long-path", "renamed", "empty"}
    assert reasons["bad-types"].startswith("files must be an object")
    assert "4096 characters long" in reasons["long-path"] and LONG not in reasons["long-path"]
    assert "rename the folder" in reasons["renamed"] and "no manifest.json" in reasons["empty"]
    assert [r.release_id for r in list_releases(root)] == ["r1", "r0"]  # unchanged for its callers
    s = scan.valid[1].summary()
    assert s.profile is None and s.int8_auc is None and s.created_at_ms == 0  # free-form fields of odd shape


def test_parity_releases_list_prints_broken_folders_after_the_valid_ones(release, tmp_path):
    root = _releases_root_with_broken_folders(release, tmp_path)
    p = subprocess.run([sys.executable, "-m", "parity", "releases", "list", "--root", str(root)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    lines = p.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["r1", "r0"]
    assert [line.split(":")[0] for line in lines[2:]] == [f"BROKEN {root / n}" for n in ("bad-types", "empty", "long-path", "renamed")]
    assert lines[2] == f"BROKEN {root / 'bad-types'}: files must be an object, not a string 'x'"
    assert lines[3] == f"BROKEN {root / 'empty'}: no manifest.json (a partial or foreign folder)"
    assert all(len(line) < 400 for line in lines)
    show = subprocess.run([sys.executable, "-m", "parity", "releases", "show", "renamed", "--root", str(root)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert show.returncode == 2 and len(show.stderr.strip().splitlines()) == 1 and "rename the folder" in show.stderr
