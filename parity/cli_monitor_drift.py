"""`parity monitor drift`: the served features and predictions of one release against the
reference histograms it was trained with (monitor.drift), over a time window of the served log.

Only the `sampled` rows are compared: they were drawn uniformly from each request's candidate
list, the population the reference describes; the returned items were chosen by the ranker and
would show "drift" that is only selection. Prints a table, then one JSON line. Drift is a
finding, not a failure: exit 0 whether or not anything drifted; exit 2 for bad input.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from parity.argtypes import number
from parity.output import Output

__all__ = ["parse_duration", "register"]

REFERENCE_SAMPLE = 2000  # raw values per column of a rolling reference (KS), as a release keeps

_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(name: str) -> Callable[[str], int]:
    """'90s', '15m', '1h', '2d', '500ms' or a bare integer of milliseconds, > 0."""
    def parse(text: str) -> int:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*", text)
        if not m:
            raise argparse.ArgumentTypeError(f"{name} must be a duration like 30m, 1h, 2d or milliseconds, got {text!r}")
        ms = float(m.group(1)) * _UNITS[m.group(2) or "ms"]
        if not math.isfinite(ms) or ms < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1 ms, got {text!r}")
        return int(ms)

    return parse


def _alpha(text: str) -> float:
    v = number("--alpha")(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"--alpha must be in (0, 1), got {text}")
    return v


def _reference_option(text: str) -> str | int:
    """'release', or 'served:WINDOW' parsed to WINDOW in ms."""
    if text == "release":
        return text
    if text.startswith("served:"):
        return parse_duration("--reference served:WINDOW")(text.split(":", 1)[1])
    raise argparse.ArgumentTypeError(f"--reference must be 'release' or 'served:WINDOW' (e.g. served:24h), got {text!r}")


def _rows(batches, since: int, until: int, arm: str | None):
    X_parts, p_parts, columns = [], [], None
    for b in batches:
        t = b.table
        ts = t.column("ts_ms").to_numpy()
        mask = t.column("sampled").to_numpy(zero_copy_only=False) & (ts >= since) & (ts < until)
        if arm is not None:
            mask &= np.asarray(t.column("arm").to_pylist()) == arm
        if columns is not None and b.columns != columns:
            raise ValueError(f"--served-log: release {b.release_id} was logged with two column lists")
        columns = b.columns
        X_parts.append(b.feature_matrix(mask))
        p_parts.append(np.asarray(t.column("score").to_numpy(zero_copy_only=False), dtype=np.float32)[mask])
    return columns, np.concatenate(X_parts), np.concatenate(p_parts)


def register(msub: argparse._SubParsersAction, positive: Callable, nonneg: Callable) -> None:
    from monitor.drift import DriftThresholds

    d = DriftThresholds()
    p = msub.add_parser(
        "drift", help="drift of served features and predictions against the release's reference",
        description="Per feature column and for the predictions: PSI, KL, Jensen-Shannon distance, a KS (or chi-square) "
        "p-value with a Benjamini-Hochberg correction across columns, and the missing rate, over the sampled rows of "
        "the served log in [UNTIL - WINDOW, UNTIL). A column drifts when PSI or JS crosses its threshold with an adjusted "
        "p-value below alpha, or its missing rate rises by more than --missing-rise. Last line: JSON. Exit 0 whether or "
        "not anything drifted; 2 for bad input.")
    p.add_argument("--served-log", required=True, help="served log folder (parity serve --served-log)")
    p.add_argument("--release", required=True, help="release folder whose reference (and logged rows) to compare")
    p.add_argument("--window", type=parse_duration("--window"), default=6 * 3_600_000, help="how far back from --until (default 6h, the calibrated window)")
    p.add_argument("--until", type=nonneg("--until"), default=None, help="window end, ms since the epoch, exclusive (default: just after the last logged row of the release)")
    p.add_argument("--reference", type=_reference_option, default="release",
                   help="what to compare against: 'release' (the reference the release carries: served candidate rows of its "
                   "validation slice onward) or 'served:WINDOW' (rolling: the served log's own sampled rows of WINDOW before the "
                   "compared window). The calibration (bench/drift_calibrate.py) found served:48h with a 6h window the only "
                   "option under 5%% false alarms per column-window; release is the default because a new release has no "
                   "log yet. Default: release")
    p.add_argument("--arm", choices=("primary", "canary", "shadow"), default=None, help="only rows of this arm (default: every arm)")
    p.add_argument("--html", default=None, help="also write an HTML report to this file (needs the monitor extra: matplotlib)")
    p.add_argument("--psi", type=number("--psi"), default=d.psi, help=f"PSI threshold (default {d.psi})")
    p.add_argument("--js", type=number("--js"), default=d.js, help=f"Jensen-Shannon distance threshold, base 2 (default {d.js})")
    p.add_argument("--alpha", type=_alpha, default=d.alpha, help=f"significance after BH (default {d.alpha})")
    p.add_argument("--missing-rise", type=number("--missing-rise"), default=d.missing_rise, help=f"missing-rate rise that alarms (default {d.missing_rise})")
    p.add_argument("--min-rows", type=positive("--min-rows"), default=d.min_rows, help=f"live rows needed before anything alarms (default {d.min_rows})")
    p.set_defaults(func=_drift, outputs=lambda a: [Output.of(a.html, "file")] if a.html else [])


def _drift(args: argparse.Namespace) -> int:
    from export.reference import column_references, histogram_reference, release_reference
    from export.release import load_release
    from monitor.drift import DriftThresholds, drift_report
    from monitor.served_log import read_served_log

    th = DriftThresholds(psi=args.psi, js=args.js, alpha=args.alpha, missing_rise=args.missing_rise, min_rows=args.min_rows)
    if args.html:
        from monitor.drift_html import MissingExtra, require_matplotlib

        try:
            require_matplotlib()  # before any work: a missing extra should not cost a read of the log
        except MissingExtra as exc:
            raise ValueError(f"--html: {exc}") from None
    rel = load_release(args.release)
    reference = release_reference(rel)
    if args.reference == "release" and reference is None:
        raise ValueError(f"--release {args.release}: release {rel.release_id} carries no reference histograms")
    root = Path(args.served_log)
    if not root.is_dir():
        raise FileNotFoundError(f"--served-log {root}: no such directory")
    batches = [b for b in read_served_log(root) if b.release_id == rel.release_id]
    if not batches:
        others = sorted({b.release_id for b in read_served_log(root)})
        raise ValueError(f"--release: the served log {root} holds no rows of release {rel.release_id}"
                         + (f" (it holds {', '.join(others)})" if others else " (it is empty)"))
    ts_all = np.concatenate([b.table.column("ts_ms").to_numpy() for b in batches])
    until = args.until if args.until is not None else int(ts_all.max()) + 1
    since = until - args.window
    columns, X, preds = _rows(batches, since, until, args.arm)
    ref_desc = "release"
    if args.reference != "release":  # rolling: the served log's own rows just before the window
        ref_since = since - int(args.reference)
        _, Xr, pr = _rows(batches, ref_since, since, args.arm)
        if len(Xr) < 2:
            raise ValueError(f"--reference served: the served log holds {len(Xr)} sampled rows in [{ref_since}, {since}); "
                             "too few for a reference")
        reference = {"features": column_references(Xr, columns, sample=REFERENCE_SAMPLE),
                     "prediction": histogram_reference(pr, bins=20, sample=REFERENCE_SAMPLE)}
        ref_desc = f"served [{ref_since}, {since}) ({len(Xr)} rows)"
    feats = reference["features"]
    absent = [c for c in columns if c not in feats]
    if absent:
        raise ValueError(f"--release: the reference has no histogram for logged column(s) {', '.join(absent[:5])}")
    report = drift_report(reference, list(columns), X, preds, th)
    _print_table(report)
    out = {"release_id": rel.release_id, "since_ms": since, "until_ms": until, "arm": args.arm, "reference": ref_desc} | report.to_dict()
    if args.html:
        from monitor.drift_html import render_html

        page = render_html(report, context={"release": rel.release_id, "served log": str(root), "window (ms)": f"[{since}, {until})",
                                            "arm": args.arm or "all", "reference": ref_desc})
        Path(args.html).write_text(page, encoding="utf-8")
        out["html"] = str(Path(args.html))
    print(json.dumps(out, sort_keys=True))
    return 0


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _print_table(report) -> None:
    entries = list(report.features) + ([report.prediction] if report.prediction is not None else [])
    width = max([len(f.name) for f in entries] + [6])
    print(f"{'column':<{width}}  {'rows':>6}  {'psi':>7}  {'js':>6}  {'test':>8}  {'p_bh':>9}  {'missing':>7}  {'ref_miss':>8}  drift")
    for f in entries:
        print(f"{f.name:<{width}}  {f.rows:>6}  {_fmt(f.psi, '7.3f')}  {_fmt(f.js, '6.3f')}  {f.test or '-':>8}  "
              f"{_fmt(f.p_adjusted, '9.2e')}  {_fmt(f.missing_rate, '7.1%')}  {f.reference_missing_rate:>8.1%}  "
              f"{','.join(f.reasons) if f.drifted else ''}")
    print(f"{len(report.drifted)} of {len(entries)} drifted over {report.rows} sampled rows")
