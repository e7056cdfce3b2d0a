"""`make demo` must keep working: run its job in-process on a temp folder."""
from __future__ import annotations

from parity.demo import main


def test_the_demo_runs_end_to_end_and_proves_parity(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "parity PROVEN" in out and "0 mismatches" in out
    assert "duplicates ignored" in out
    assert "served 10 items to known and new users: True" in out
    assert "live events reflected in recommendations: True" in out and "server stopped cleanly" in out
    assert "device ranked offline from a signed bundle: True" in out and "never synced says so" in out
