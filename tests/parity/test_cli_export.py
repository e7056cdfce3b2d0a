"""`parity export ...` from the command line: keys, tokens, a device bundle from a release, a
delta, and bad values refused with one line naming the option."""
from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from export.device.files import MANIFEST, read_manifest
from export.device.keys import load_keys

ROOT = Path(__file__).resolve().parents[2]


def parity(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _one_line_error(p: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("parity: error:") and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[-1], lines[-1]


def test_keygen_and_token(tmp_path: Path) -> None:
    p = parity("export", "keygen", "--out", str(tmp_path / "k"))
    assert p.returncode == 0, p.stderr
    kid = json.loads(p.stdout)["key_id"]
    assert stat.S_IMODE((tmp_path / "k/signing.key").stat().st_mode) == 0o600
    _one_line_error(parity("export", "keygen", "--out", str(tmp_path / "k")), 2, "--out", "--force")
    assert load_keys(tmp_path / "k").key_id == kid  # the refusal changed nothing
    t = parity("export", "token", "--keys", str(tmp_path / "k"), "--user", "42")
    assert t.returncode == 0 and t.stdout.strip() == load_keys(tmp_path / "k").token(42)
    _one_line_error(parity("export", "token", "--keys", str(tmp_path / "nokeys"), "--user", "42"), 2, "--keys")
    bad = parity("export", "token", "--keys", str(tmp_path / "k"), "--user", "-3")
    assert bad.returncode == 2 and "--user" in bad.stderr


def test_device_and_delta_from_the_command_line(release_dir: Path, sim_copy: Path, tmp_path: Path) -> None:
    assert parity("export", "keygen", "--out", str(tmp_path / "k")).returncode == 0
    users = tmp_path / "users.txt"
    users.write_text("# two users\n1\n2\n")
    out = tmp_path / "bundle"
    p = parity("export", "device", "--release", str(release_dir), "--events", str(sim_copy), "--keys", str(tmp_path / "k"),
               "--out", str(out), "--users", str(users), "--profile", "tiny")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    keys = load_keys(tmp_path / "k")
    payload = read_manifest(out / MANIFEST, keys.public_pem)
    assert rep["users_written"] == 2 and rep["version"] == payload["version"]
    assert sorted(p.name.split(".")[0] for p in (out / "users").glob("*.npz")) == sorted([keys.token(1), keys.token(2)])
    d = parity("export", "delta", "--bundle", str(out), "--events", str(sim_copy), "--keys", str(tmp_path / "k"), "--release", str(release_dir))
    assert d.returncode == 0, d.stderr
    assert read_manifest(out / MANIFEST, keys.public_pem)["version"] > payload["version"]
    # refusals name the option
    users.write_text("1\nseven\n")
    _one_line_error(parity("export", "device", "--release", str(release_dir), "--events", str(sim_copy), "--keys", str(tmp_path / "k"),
                           "--out", str(tmp_path / "b2"), "--users", str(users)), 2, "--users", "seven")
    other = tmp_path / "k2"
    assert parity("export", "keygen", "--out", str(other)).returncode == 0
    _one_line_error(parity("export", "delta", "--bundle", str(out), "--events", str(sim_copy), "--keys", str(other)), 2, "--bundle", "signature")
    _one_line_error(parity("export", "serve", "--bundle", str(tmp_path)), 2, "--bundle")
