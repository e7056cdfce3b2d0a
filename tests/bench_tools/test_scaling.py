"""The scaling study's pure parts (bench/scaling_report.py): growth exponents on synthetic curves,
the verdicts, and the section rendered from a fixed result dict. Nothing here trains or
simulates: the measurements themselves are `make bench-scaling`."""
from __future__ import annotations

import math

import pytest

from bench.report import update_results
from bench.scaling_report import END, START, exponents, fastest_step, render, verdict


def _train_row(n: int, cpu: float, steps: dict[str, float], rss: float = 500.0) -> dict:
    return {"users": n // 100, "items": 2000, "events": n, "train_wall_s": cpu * 1.3, "train_cpu_s": cpu, "process_cpu_s": cpu + 5,
            "rss_peak_mb": rss, "timings_s": steps}


def _result() -> dict:
    sizes = [250_000, 1_000_000, 4_000_000]
    # training CPU grows as events^2 (super-linear), memory as events^0.5
    train = [_train_row(n, 2.0 * (n / 250_000) ** 2, {"training_data": 1.0 * (n / 250_000) ** 2, "two_tower": 3.0, "teacher": 1.0},
                        rss=400.0 * (n / 250_000) ** 0.5) for n in sizes]
    items = [_train_row(4 * 14 * 100 * i, 10.0 * i / 3000, {"training_data": 5.0 * i / 3000, "two_tower": 3.0}) | {"items": i}
             for i in (3000, 10000)]
    batch = [{"events": n, "rss_peak_mb": 300.0,
              "local": {"materialise_s": n / 60_000, "materialise_cpu_s": n / 60_000, "records": n // 50, "states_s": n / 200_000},
              "ray": {"materialise_s": n / 70_000, "materialise_cpu_s": n / 200_000, "records": n // 50, "states_s": n / 150_000}} for n in sizes]
    device = [{"users": u, "events": u * 20, "seconds": u / 5000, "cpu_s": u / 6000, "bytes_per_user": 2800.0, "rss_peak_mb": 250.0,
               "phases_s": {"user_files": u / 8000, "load": 0.1, "total": u / 5000}} for u in (2000, 10000, 50000)]
    return {
        "command": "nice -n 10 python -m bench.scaling", "started_at": "2026-11-30T15:40:00Z", "finished_at": "2026-11-30T16:10:00Z",
        "machine": {"cpu": "AMD EPYC", "cores": 2, "cores_usable": 2, "python": "3.11.7"},
        "config": {"days": 14, "seed": 0, "data_note": "users = events / 100"},
        "plots": ["bench/results/scaling_train_events.png"],
        "notes": {"batch": "not used: batch is linear"},
        "curves": {"train_events": {"rows": train}, "train_items": {"rows": items, "item_item_fit": None},
                   "batch": {"rows": batch, "ray": {"cpus": 2, "workers": 2, "partitions_per_worker": 2}},
                   "device": {"rows": device}, "workers": {"source": "bench/results/serving_workers.json", "result": None}},
        "not_run": ["16,000,000 events (`--big`): not run by default on this machine (2 shared cores)."],
    }


def test_exponent_of_a_power_law_is_its_power() -> None:
    rows = [{"n": n, "lin": 3.0 * n, "sq": 0.5 * n**2, "flat": 7.0, "nested": {"v": n**1.5}} for n in (10, 100, 1000)]
    e = exponents(rows, "n", ["lin", "sq", "flat", "nested.v"])
    assert e["lin"] == pytest.approx(1.0) and e["sq"] == pytest.approx(2.0)
    assert e["flat"] == pytest.approx(0.0, abs=1e-12) and e["nested.v"] == pytest.approx(1.5)


def test_exponent_needs_two_sizes_with_the_value() -> None:
    rows = [{"n": 10, "v": 1.0}, {"n": 100}]
    assert exponents(rows, "n", ["v", "absent"]) == {"v": None, "absent": None}


def test_exponent_of_noisy_linear_points_is_near_one() -> None:
    rows = [{"n": n, "v": n * f} for n, f in zip((1e3, 1e4, 1e5, 1e6), (1.05, 0.95, 1.02, 0.98))]
    assert exponents(rows, "n", ["v"])["v"] == pytest.approx(1.0, abs=0.03)


def test_fastest_step_ignores_steps_too_small_to_matter() -> None:
    rows = [{"events": n, "timings_s": {"big_linear": n / 1000, "tiny_cubic": 1e-9 * n**3 / 1e9, "flat": 5.0}} for n in (1e3, 1e4, 1e5)]
    step, e, every = fastest_step(rows, "events")
    assert step == "big_linear" and e == pytest.approx(1.0)
    assert every["tiny_cubic"] == pytest.approx(3.0)


def test_verdicts_linear_super_linear_and_unmeasured() -> None:
    assert verdict({"a": 1.04, "b": 0.3}).startswith("**Verdict: linear** (exponents a 1.04, b 0.30")
    s = verdict({"a": 1.04, "b": 1.42}, "the join sorts the whole log")
    assert s.startswith("**Verdict: super-linear** (b 1.42 > 1.1)") and s.endswith("the join sorts the whole log")
    assert "a 1.04" not in s
    assert "no explanation recorded yet" in verdict({"a": 1.5})
    assert "not enough sizes" in verdict({"a": None})


def test_rendered_section_names_command_machine_exponents_and_verdicts() -> None:
    text = render(_result())
    assert text.startswith(START) and text.rstrip().endswith(END)
    assert "`nice -n 10 python -m bench.scaling`" in text and "AMD EPYC, 2 cores" in text and "2026-11-30T15:40:00Z" in text
    # curve 1: CPU grows as events^2, RSS as events^0.5
    assert "train CPU 2.00, peak RSS 0.50" in text
    assert "**Verdict: super-linear** (train CPU 2.00 > 1.1): no explanation recorded yet" in text
    assert "**training_data**, exponent 2.00" in text
    assert "Between the two largest sizes alone: train CPU 2.00, peak RSS 0.50" in text
    assert "| 2,500 | 2,000 | 250,000 |" in text  # the table's first row: users, items, events
    # curve 3: linear on both engines, throughput in events/s
    assert "**Verdict: linear** (exponents local materialise 1.00, local states 1.00, ray materialise 1.00, ray states 1.00" in text
    assert "| 1,000,000 | local | 16.67 | 60,000 |" in text
    # curve 4: export time grows linearly; the exporter's own total is not a phase
    assert "export wall 1.00, export CPU 1.00" in text
    device_header = next(line for line in text.split("### 4.")[1].splitlines() if line.startswith("| users exported |"))
    assert "load" in device_header and "total" not in device_header
    assert "run `make bench-workers`" in text
    assert "16,000,000 events (`--big`)" in text


def test_a_note_explains_a_super_linear_curve() -> None:
    r = _result()
    r["notes"]["train_events"] = "the PIT join sorts every event per feature set"
    assert "**Verdict: super-linear** (train CPU 2.00 > 1.1): the PIT join sorts every event per feature set" in render(r)


def test_a_note_follows_a_linear_verdict_too() -> None:
    assert verdict({"a": 0.9}, "step x grows faster") == "**Verdict: linear** (exponents a 0.90; all <= 1.1). step x grows faster"


def test_worker_capacity_is_rendered_when_the_study_exists() -> None:
    r = _result()
    r["curves"]["workers"]["result"] = {"started_at": "2026-11-29T10:00:00Z", "scenarios": [
        {"variant": "parity_w1", "store": "memory", "capacity_qps": 400.0},
        {"variant": "parity_w2", "store": "memory", "capacity_qps": 700.0},
        {"variant": "baseline", "store": "memory", "capacity_qps": 100.0}]}
    text = render(r)
    assert "| memory | 2 | 700 | 1.75x |" in text
    assert f"memory {math.log(700 / 400) / math.log(2):.2f}" in text
    assert "run `make bench-workers`" not in text


def test_the_section_is_spliced_between_its_markers_only(tmp_path) -> None:
    md = tmp_path / "RESULTS.md"
    other = "# Benchmark results\n\n<!-- generated:device:start -->\nkept\n<!-- generated:device:end -->\n\nhand-written note\n"
    md.write_text(other)
    update_results(md, render(_result()), START, END)
    first = md.read_text()
    assert first.startswith(other) and first.count(START) == 1  # appended at the end, everything else byte for byte
    r = _result()
    r["started_at"] = "2026-12-01T09:00:00Z"
    update_results(md, render(r), START, END)
    second = md.read_text()
    assert second.startswith(other) and second.count(START) == 1 and "2026-12-01T09:00:00Z" in second and "2026-11-30T15:40:00Z" not in second


def test_curves_from_separate_runs_name_each_run_once() -> None:
    r = _result()
    r["runs"] = [{"command": "python -m bench.scaling", "started_at": "2026-11-30T15:00:00Z", "curves": ["train_events", "train_items", "batch"]},
                 {"command": "python -m bench.scaling --curves train_items", "started_at": "2026-11-30T16:00:00Z", "curves": ["train_items"]}]
    text = render(r)
    assert "  - `python -m bench.scaling` at 2026-11-30T15:00:00Z: train_events, batch\n" in text
    assert "  - `python -m bench.scaling --curves train_items` at 2026-11-30T16:00:00Z: train_items\n" in text


def test_the_cited_item_item_figures_and_releases_are_rendered_with_their_source() -> None:
    r = _result()
    r["curves"]["train_items"]["item_item_fit"] = {
        "source": "bench/results/item_item_scale.json", "started_at": "2026-11-30T13:04:01Z", "data": "4 users per item",
        "fits": [{"items": n, "engagements": 80 * n, "fit_s": n / 1000, "fit_cpu_s": n / 1000, "rss_peak_mb": 300.0, "stored_mb": n / 1000}
                 for n in (3000, 10000)],
        "growth_exponent": {"fit_cpu_s": 1.21, "fit_s": 1.03, "rss_peak_mb": 0.73, "stored_mb": 1.0},
        "releases": {"sparse": {"items": 10000, "total_s": 194.2, "timings_s": {"candidate_lists": 63.5, "training_data": 65.1}}}}
    text = render(r)
    assert "from `bench/results/item_item_scale.json` (2026-11-30T13:04:01Z" in text and "| 10,000 | 800,000 | 10.0 | 10.0 | 300 | 10.0 |" in text
    assert "**Verdict: super-linear** (fit CPU 1.21 > 1.1)" in text
    assert "sparse at 10,000 items 194 s (candidate_lists 64 s, training_data 65 s)" in text
