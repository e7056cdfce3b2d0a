"""Every `parity` subcommand that writes turns a filesystem refusal into one line,
`parity: error: cannot write PATH: REASON`, and exit code 1: never a traceback.

Tests run as root, where chmod does not stop a write. So the refusals here are real for any
user: a path under a regular file (`plainfile/out`: ENOTDIR), a name the command must create
already taken by a folder or a file of the wrong kind (EISDIR, EEXIST, ENOTDIR), /sys, where
even root may not create a file (EPERM), and /dev/full (ENOSPC)."""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parity.output import CannotWrite, Output, cannot_write, preflight

ROOT = Path(__file__).resolve().parents[2]


def parity(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def assert_cannot_write(p: subprocess.CompletedProcess, path: Path | str) -> None:
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"parity: error: cannot write {path}"), lines[0]


@pytest.fixture
def under_a_file(tmp_path: Path) -> Path:
    """A path whose parent is a regular file: no one, root included, can create it."""
    plain = tmp_path / "plainfile"
    plain.write_text("not a folder")
    return plain / "out"


@pytest.mark.parametrize("command", [
    ["data", "simulate", "--users", "20", "--items", "10", "--days", "1", "--out", "{bad}"],
    ["train", "--events", "{sim}", "--profile", "tiny", "--out", "{bad}"],
    ["bench", "latency", "--target", "127.0.0.1:1", "--qps", "1", "--seconds", "1", "--out", "{bad}"],
])
def test_an_output_under_a_regular_file_is_one_line_and_exit_1(command, under_a_file, small_sim):
    p = parity(*[a.replace("{bad}", str(under_a_file)).replace("{sim}", str(small_sim)) for a in command])
    assert_cannot_write(p, under_a_file)
    assert "is not a directory" in p.stderr


def test_import_movielens_into_an_unwritable_place_is_one_line(movielens_dir, under_a_file):
    assert_cannot_write(parity("data", "import-movielens", str(movielens_dir), "--out", str(under_a_file)), under_a_file)


def test_a_refusal_the_preflight_cannot_see_is_mapped_while_the_command_runs():
    # As root os.access() says /sys is writable, but creating a folder there fails with EPERM.
    target = Path("/sys/parity-cli-test-out")
    try:
        target.mkdir()
    except PermissionError:
        pass
    except OSError as exc:
        pytest.skip(f"/sys refuses differently here ({exc}); the other tests cover the mapping")
    else:
        target.rmdir()
        pytest.skip("/sys is writable here")
    p = parity("data", "simulate", "--users", "20", "--items", "10", "--days", "1", "--out", str(target))
    assert_cannot_write(p, target)


def test_materialize_with_its_offline_folder_taken_by_a_file(sim_copy):
    offline = sim_copy / "offline"
    shutil.rmtree(offline, ignore_errors=True)
    offline.write_text("a file where the offline store goes")
    assert_cannot_write(parity("features", "materialize", "--events", str(sim_copy)), offline)


def test_delete_user_with_its_audit_folder_taken_by_a_file(sim_copy):
    audit = sim_copy / "events" / "_audit"
    audit.write_text("a file where the audit folder goes")
    assert_cannot_write(parity("features", "delete-user", "--events", str(sim_copy), "--user", "3", "--reason", "test"), audit)


def test_retire_with_a_view_folder_taken_by_a_file(sim_copy):
    from parity.workspace import open_workspace

    ws = open_workspace(sim_copy)
    view = ws.offline.root / ws.sets[0].name / ws.sets[0].version
    shutil.rmtree(ws.offline.root, ignore_errors=True)
    view.parent.mkdir(parents=True)
    view.write_text("a file where the view folder goes")
    p = parity("features", "retire", ws.sets[0].name, "--events", str(sim_copy), "--store", "memory")
    assert_cannot_write(p, view)


def test_data_check_repair_that_cannot_mark_the_log(sim_copy):
    events = sim_copy / "events"
    for side in events.glob("day=*/*.sha256"):
        side.unlink()  # an old log: --repair adds checksums, then marks it
    (events / "_format.json").unlink()
    (events / "_format.json").mkdir()  # ... and marking it must replace this folder: EISDIR
    p = parity("data", "check", "--events", str(sim_copy), "--repair")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("parity: error: cannot write ") and "_format.json" in p.stderr


def test_commands_that_only_read_declare_no_outputs_and_keep_exit_2_for_a_missing_input(tmp_path):
    p = parity("features", "materialize", "--events", str(tmp_path / "missing"))
    assert p.returncode == 2 and "no such directory" in p.stderr  # not "cannot write"


# ------------------------------------------------------------------ the mapping itself


def test_a_write_error_without_a_file_name_is_the_output_that_was_being_written(tmp_path):
    with pytest.raises(OSError) as e:
        with open("/dev/full", "wb", buffering=0) as f:
            f.write(b"x")  # ENOSPC, a real full device; the error names no file
    assert e.value.errno == errno.ENOSPC and e.value.filename is None
    out = Output.of(tmp_path / "out")
    refused = cannot_write(e.value, [out])
    assert refused is not None and refused.path == out.path and "No space left" in str(refused)


def test_an_error_about_an_input_or_a_domain_message_is_not_a_write_error(tmp_path):
    out = [Output.of(tmp_path / "out")]
    with pytest.raises(FileNotFoundError) as e:
        open(tmp_path / "input.csv")
    assert cannot_write(e.value, out) is None
    assert cannot_write(FileNotFoundError("--events x: no such directory"), out) is None
    with pytest.raises(OSError) as inside:
        (tmp_path / "out" / "deep" / "file").write_text("x")  # out does not exist: ENOENT inside the output
    assert cannot_write(inside.value, out).path == tmp_path / "out" / "deep" / "file"


def test_preflight_creates_nothing_and_names_the_blocking_file(tmp_path, under_a_file):
    preflight(Output.of(tmp_path / "a" / "b"))
    assert not (tmp_path / "a").exists()
    with pytest.raises(CannotWrite, match="plainfile is not a directory"):
        preflight(Output.of(under_a_file))
    with pytest.raises(CannotWrite, match="it is a directory"):
        preflight(Output.of(tmp_path, "file"))
