"""`parity monitor skew`: the features the server served, recomputed with the batch path once the
events have landed, per feature set (monitor/skew.py). Skew found is a finding, reported with
exit 0; bad input (a missing folder, an unknown release, nothing to check) exits 2 naming the
option."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

__all__ = ["register"]


def register(msub: argparse._SubParsersAction, positive: Callable, nonneg: Callable) -> None:
    p = msub.add_parser(
        "skew", help="live parity: recompute the served features with the batch path and report what differs",
        description="For every logged row (returned items and sampled candidates) of the served log, recomputes the ranker's "
        "raw inputs with the batch point-in-time join as of the request's time and compares them with what the ranker saw, "
        "per feature set: values compared, share that differ, max absolute difference. The list-relative retrieval.* "
        "columns are outside the check. Run it once the events up to the requests' times are in the event log. Last line: "
        "JSON. Exit 0 whether or not skew is found; 2 on bad input.")
    p.add_argument("--served-log", required=True, help="the served log folder (parity serve --served-log DIR)")
    p.add_argument("--events", required=True, help="data dir (or its events/ folder) whose event log has landed")
    p.add_argument("--release", default=None, help="only rows served by this release: its id, or its folder (then its "
                   "feature-set versions are checked against the data dir's)")
    p.add_argument("--since-ms", type=nonneg("--since-ms"), default=None, help="only requests at or after this time (ms)")
    p.add_argument("--until-ms", type=nonneg("--until-ms"), default=None,
                   help="only requests before this time (ms), e.g. where the landed events end")
    p.add_argument("--examples", type=nonneg("--examples"), default=3, help="differing values shown per feature set (default 3)")
    p.set_defaults(func=_skew)


def _release_filter(arg: str | None, sets) -> str | None:
    """The release id to keep (None: all); a release folder is read and its versions checked."""
    if arg is None:
        return None
    path = Path(arg)
    if not path.is_dir():
        return arg
    from export.release import ReleaseError, load_release

    try:
        rel = load_release(path)
    except ReleaseError as exc:
        raise ValueError(f"--release {arg}: {exc}") from None
    have = {fs.name: fs.version for fs in sets}
    wrong = [f"{n} {v} (data dir: {have.get(n, 'absent')})" for n, v in sorted(rel.feature_set_versions.items()) if have.get(n) != v]
    if wrong:
        raise ValueError(f"--release {arg}: release {rel.release_id} was trained on feature-set versions --events does not define: "
                         f"{', '.join(wrong)}; check it against the data dir it was trained on")
    return rel.release_id


def _skew(args: argparse.Namespace) -> int:
    from features.catalog import ItemCatalog
    from features.datasets import read_items
    from monitor.served_log import read_served_log
    from monitor.skew import check_skew
    from parity.workspace import open_workspace

    if args.since_ms is not None and args.until_ms is not None and args.until_ms <= args.since_ms:
        raise ValueError(f"--until-ms {args.until_ms} must be after --since-ms {args.since_ms}")
    root = Path(args.served_log)
    if not root.is_dir():
        raise FileNotFoundError(f"--served-log {root}: no such folder")
    ws = open_workspace(args.events)
    release = _release_filter(args.release, ws.sets)
    batches = read_served_log(root, since_ms=args.since_ms, until_ms=args.until_ms)
    if not batches:
        raise ValueError(f"--served-log {root}: no finished rows{' in the time range' if args.since_ms or args.until_ms else ''} "
                         "(parts still being written are skipped; a server finishes them on rotation and on shutdown)")
    if release is not None:
        have = sorted({b.release_id for b in batches})
        batches = [b for b in batches if b.release_id == release]
        if not batches:
            raise ValueError(f"--release {args.release}: release {release} served no logged rows; the log holds {have}")
    until = max(int(b.table.column("ts_ms").to_numpy().max()) for b in batches)
    events = ws.log.read(end_ts=until, must_exist=True).deduplicated()  # as of t reads ts < t: nothing later matters
    items = ItemCatalog.from_table(read_items(ws.data_dir))
    rep = check_skew(batches, events, ws.sets, items, max_examples=args.examples)
    print(f"served log {root}: {rep.rows} logged rows of {rep.requests} requests (releases {', '.join(rep.releases)}), "
          f"recomputed as of each request's time from {rep.events} events of {ws.data_dir}")
    if rep.skipped_rows:
        print(f"  {rep.skipped_rows} rows without features (errors) not compared")
    if rep.rows_after_log_end:
        print(f"  caution: {rep.rows_after_log_end} rows are later than the log's last event: live events after it that have "
              "not landed in the log yet show up as skew")
    print(f"  {'feature set':<18} {'columns':>7} {'compared':>10} {'differ':>8} {'share':>8} {'max_abs_diff':>13}")
    for s in rep.sets:
        print(f"  {s.feature_set:<18} {len(s.columns):>7} {s.compared:>10} {s.differ:>8} {s.share:>8.4f} {s.max_abs_diff:>13.4g}")
        for e in s.examples:
            print(f"    differs: {e}")
    if rep.excluded:
        print(f"  not checked: {', '.join(rep.excluded)} (list-relative: they depend on the request's whole candidate list, "
              "not on the row)")
    verdict = "no skew" if rep.differ == 0 else f"SKEW in {', '.join(s.feature_set for s in rep.sets if s.differ)}"
    print(f"  {verdict}: {rep.differ} of {rep.compared} values differ")
    print(json.dumps(rep.summary(), sort_keys=True))
    return 0
