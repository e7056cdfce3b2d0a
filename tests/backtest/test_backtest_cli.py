"""`parity backtest` on the command line: bad input names its option, the last line is JSON, the
plot is written."""
from __future__ import annotations

import json

import pytest

from parity.cli import main


def _run(argv: list[str]) -> int:
    """main()'s exit code, argparse's own refusals (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.mark.parametrize("args, option", [
    (["--staleness", "5x"], "--staleness"),
    (["--staleness", "0,,1h"], "--staleness"),
    (["--missing", "1.5"], "--missing"),
    (["--missing", "0,abc"], "--missing"),
    (["--lookup-latency", "30,10", "--budget-ms", "20"], "--lookup-latency"),
    (["--lookup-latency", "2,40"], "--budget-ms"),
    (["--budget-ms", "0"], "--budget-ms"),
    (["--max-users", "0"], "--max-users"),
    (["--sets", "user_activity,nope"], "--sets"),
    (["--lookup-latency", "no-such-file.txt", "--budget-ms", "20"], "--lookup-latency"),
])
def test_bad_input_is_refused_with_the_option_named(args, option, release_dir, small_sim, capsys):
    code = _run(["backtest", "--release", str(release_dir), "--events", str(small_sim), "--max-users", "3", *args])
    err = capsys.readouterr().err
    assert code == 2 and option in err and "Traceback" not in err


def test_a_run_prints_a_table_then_one_json_line_and_writes_the_plot_and_the_json(release_dir, small_sim, tmp_path, capsys):
    png, js, lat = tmp_path / "q.png", tmp_path / "out.json", tmp_path / "lat.txt"
    lat.write_text("1\n2\n3\n90\n")
    code = _run(["backtest", "--release", str(release_dir), "--events", str(small_sim), "--max-users", "6", "--staleness", "0,2h",
                 "--missing", "0,0.5", "--sets", "user_activity,item_popularity", "--lookup-latency", str(lat), "--budget-ms", "50",
                 "--plot", str(png), "--json", str(js)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    doc = json.loads(out[-1])
    assert doc == json.loads(js.read_text())
    assert doc["users"] == 6 and doc["sets"] == ["user_activity", "item_popularity"]
    assert set(doc["tolerance"]) == {"user_activity", "item_popularity", "user_record", "all"}
    assert {c["kind"] for c in doc["conditions"]} == {"fresh", "staleness", "missing", "latency"}
    assert doc["latency"]["budget_ms"] == 50 and doc["latency"]["expected_share_over"] == 0.25
    assert any(line.startswith("tolerance") for line in out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
