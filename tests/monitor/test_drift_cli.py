"""`parity monitor drift` on a served log written in the server's format, and the HTML report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from export.reference import release_reference
from export.release import load_release
from monitor.drift import DriftThresholds, drift_report
from monitor.served_log import COLUMNS_KEY, RELEASE_KEY, ServedRecord, records_to_table
from parity.cli import main

T0 = 1_768_000_000_000
H = 3_600_000


def _rows(reference: dict, columns: list[str], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose every column follows the reference: drawn from its raw sample (continuous
    columns), or one value per bin with the reference's shares (count columns, stored without a
    sample); its missing rate included."""
    X = np.empty((n, len(columns)), dtype=np.float32)
    for j, c in enumerate(columns):
        ref = reference["features"][c]
        if ref.get("sample"):
            X[:, j] = rng.choice(np.asarray(ref["sample"], np.float32), n)
        elif ref["shares"]:
            edges = np.asarray(ref["edges"], np.float64)
            values = np.r_[edges[0] - 1.0, (edges[:-1] + edges[1:]) / 2, edges[-1] + 1.0]  # inside each bin, float32-safe
            X[:, j] = rng.choice(values, n, p=np.asarray(ref["shares"]) / np.sum(ref["shares"]))
        else:
            X[:, j] = np.nan
        X[rng.random(n) < ref["missing_rate"], j] = np.nan
    return X, rng.choice(np.asarray(reference["prediction"]["sample"], np.float32), n)


def _write_log(root: Path, release_id: str, columns: list[str], X: np.ndarray, p: np.ndarray, ts0: int) -> None:
    """One request per 4 rows, one row in 5 returned (not sampled), as the server logs them."""
    recs = []
    for r, a in enumerate(range(0, len(X), 4)):
        n = min(4, len(X) - a)
        recs.append(ServedRecord(f"r{ts0}-{r}", ts0 + r * 1000, 7, release_id, "primary", "Recommend", "ok", None, 3.0, 200,
                                 np.arange(n, dtype=np.int64) + 1, np.full(n, -1, np.int32), p[a:a + n], ["ann"] * n,
                                 np.ones(n, bool), X[a:a + n], tuple(columns)))
    # a returned item (chosen by the ranker, not sampled) with absurd values: drift must not read it
    recs.append(ServedRecord("ret", ts0 + 5, 7, release_id, "primary", "Recommend", "ok", None, 3.0, 200, np.array([99]),
                             np.array([0], np.int32), np.array([0.5], np.float32), ["ann"], np.array([False]),
                             np.full((1, len(columns)), 1e9, np.float32), tuple(columns)))
    d = root / "dt=2026-01-09" / release_id
    d.mkdir(parents=True, exist_ok=True)
    t = records_to_table(recs).replace_schema_metadata({COLUMNS_KEY: json.dumps(columns).encode(), RELEASE_KEY: release_id.encode()})
    pq.write_table(t, d / f"part-{ts0}-1-0.parquet")


@pytest.fixture(scope="module")
def logged(release_dir: Path, tmp_path_factory) -> tuple[Path, Path, str, list[str]]:
    """A served log of the session's tiny release: an hour of reference-like rows, then an hour
    with one column shifted."""
    rel = load_release(release_dir)
    ref = release_reference(rel)  # histograms from the manifest, raw samples from reference.npz
    columns = list(rel.manifest["ranker_inputs"]["columns"])
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("served")
    X, p = _rows(ref, columns, 3000, rng)
    _write_log(root, rel.release_id, columns, X, p, T0)
    X, p = _rows(ref, columns, 3000, rng)
    shifted = columns.index("item.duration_s")
    X[:, shifted] = X[:, shifted] * 3 + 100
    _write_log(root, rel.release_id, columns, X, p, T0 + 2 * H)
    return root, release_dir, rel.release_id, columns


def _run(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main(["monitor", "drift", *args])
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), out.err


def test_drift_reports_the_shifted_column_in_its_last_json_line_and_exits_0(logged, capsys):
    root, rel, rid, _ = logged
    code, lines, _ = _run(capsys, "--served-log", str(root), "--release", str(rel), "--window", "1h")
    assert code == 0
    out = json.loads(lines[-1])
    assert out["release_id"] == rid and out["drifted"] == ["item.duration_s"]
    assert out["rows"] == 3000  # the window is the last hour; the returned item is not read
    assert any(line.startswith("item.duration_s") and line.rstrip().endswith(("psi,js", "psi", "js")) for line in lines)


def test_a_window_without_the_shift_reports_no_drift(logged, capsys):
    root, rel, _, _ = logged
    code, lines, _ = _run(capsys, "--served-log", str(root), "--release", str(rel), "--until", str(T0 + H), "--window", "1h")
    assert code == 0
    out = json.loads(lines[-1])
    assert out["drifted"] == [] and out["rows"] == 3000 and out["until_ms"] == T0 + H


def test_a_rolling_served_reference_compares_the_window_with_the_log_rows_before_it(logged, capsys):
    root, rel, _, _ = logged
    # the shifted hour against the unshifted hour 2 h before it: the served log is the reference
    code, lines, _ = _run(capsys, "--served-log", str(root), "--release", str(rel), "--reference", "served:2h", "--window", "1h")
    out = json.loads(lines[-1])
    assert code == 0 and out["drifted"] == ["item.duration_s"] and out["reference"].startswith("served [")
    code, lines, _ = _run(capsys, "--served-log", str(root), "--release", str(rel), "--reference", "served:30m",
                          "--until", str(T0 + 2 * H + 700_000), "--window", "350s")
    out = json.loads(lines[-1])
    assert code == 0 and out["drifted"] == [] and out["rows"] > 1000  # later shifted rows against earlier shifted rows
    code, _, err = _run(capsys, "--served-log", str(root), "--release", str(rel), "--reference", "served:1h", "--until", str(T0 + 10))
    assert code == 2 and "--reference served" in err  # nothing logged before the window


def test_thresholds_from_the_command_line_reach_the_decision(logged, capsys):
    root, rel, _, _ = logged
    code, lines, _ = _run(capsys, "--served-log", str(root), "--release", str(rel), "--psi", "1000", "--js", "1")
    assert code == 0
    out = json.loads(lines[-1])
    assert out["drifted"] == [] and out["thresholds"]["psi"] == 1000.0


def test_the_html_report_holds_one_plot_per_drifted_column(logged, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    root, rel, _, _ = logged
    page = tmp_path / "drift.html"
    code, lines, _ = _run(capsys, "--served-log", str(root), "--release", str(rel), "--html", str(page), "--js", "0.01", "--psi", "0.01")
    assert code == 0
    drifted = json.loads(lines[-1])["drifted"]
    text = page.read_text()
    assert len(drifted) >= 1 and text.count("<img") == len(drifted)
    assert text.count("data:image/png;base64,") == len(drifted) and "<table>" in text


@pytest.mark.parametrize("args, option", [
    (["--window", "soon"], "--window"),
    (["--alpha", "2"], "--alpha"),
    (["--psi", "-1"], "--psi"),
    (["--min-rows", "0"], "--min-rows"),
    (["--reference", "yesterday"], "--reference"),
])
def test_bad_options_exit_2_naming_the_option(logged, capsys, args, option):
    root, rel, _, _ = logged
    with pytest.raises(SystemExit) as exc:
        main(["monitor", "drift", "--served-log", str(root), "--release", str(rel), *args])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def test_a_missing_served_log_or_a_release_it_does_not_hold_exits_2_with_one_line(logged, capsys, tmp_path):
    root, rel, _, _ = logged
    code, _, err = _run(capsys, "--served-log", str(tmp_path / "nope"), "--release", str(rel))
    assert code == 2 and err.startswith("parity: error: --served-log") and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "--served-log", str(tmp_path / "empty"), "--release", str(rel))
    assert code == 2 and err.startswith("parity: error: --release")
    code, _, err = _run(capsys, "--served-log", str(root), "--release", str(tmp_path / "norelease"))
    assert code == 2 and err.startswith("parity: error:")


def test_html_without_matplotlib_names_the_extra(monkeypatch):
    from monitor.drift_html import MissingExtra, render_html

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ref = {"features": {"x": {"edges": [0.0], "shares": [0.5, 0.5], "missing_rate": 0.0}}}
    rep = drift_report(ref, ["x"], np.zeros((10, 1)))
    with pytest.raises(MissingExtra, match=r"parity\[monitor\]"):
        render_html(rep)


def test_html_plots_a_column_drifted_by_missing_values_only():
    pytest.importorskip("matplotlib")
    from monitor.drift_html import render_html

    ref = {"features": {"x": {"edges": [0.0], "shares": [0.5, 0.5], "missing_rate": 0.0},
                        "y": {"edges": [], "shares": [], "missing_rate": 0.0}}}
    X = np.column_stack([np.r_[np.full(200, -1.0), np.full(200, 1.0)], np.full(400, np.nan)])
    rep = drift_report(ref, ["x", "y"], X, thresholds=DriftThresholds())
    assert rep.drifted == ("y",)
    assert render_html(rep).count("<img") == 1
