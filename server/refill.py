"""Refilling an online store that lost its data, in a child process.

The refill (materialisation and seen records from the event log) is about a second of CPU
for the demo log and grows with the log; run in the serving process it competed with the
request loop for the interpreter lock and requests were shed while it ran (bench/RESULTS.md,
`redis_restarted_empty`). A child process has an interpreter of its own; the server waits for
it on an I/O thread. Prints the store's new epoch on its last line.

    python -m server.refill --events DATA --store redis://... --namespace NS --lateness-ms MS --seen-cap N
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["refill_in_child", "main"]

_TIMEOUT_S = 3600.0


def refill_in_child(data_dir: Path, store: str, namespace: str, lateness_ms: int, seen_cap: int) -> str:
    """Run the refill in a child process; returns the new epoch (RuntimeError with its stderr if it fails)."""
    cmd = [sys.executable, "-m", "server.refill", "--events", str(data_dir), "--store", store, "--namespace", namespace,
           "--lateness-ms", str(lateness_ms), "--seen-cap", str(seen_cap)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, cwd=Path(__file__).resolve().parents[1])
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"refill child exited {r.returncode}: {r.stderr.strip()[-500:]}")
    return r.stdout.strip().splitlines()[-1]


def main(argv: Sequence[str] | None = None) -> int:
    from features.datasets import EVENTS_DIR, load_info
    from features.online import open_store
    from features.repo import feature_sets
    from server.bootstrap import _bootstrap_store
    from server.config import ServerConfig

    p = argparse.ArgumentParser(prog="python -m server.refill")
    p.add_argument("--events", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--lateness-ms", type=int, required=True)
    p.add_argument("--seen-cap", type=int, required=True)
    a = p.parse_args(argv)
    data = Path(a.events)
    info = load_info(data)
    cfg = ServerConfig(release=data, data_dir=data, store=a.store, namespace=a.namespace, allowed_lateness_ms=a.lateness_ms, seen_cap=a.seen_cap,
                       materialize="always")
    store = open_store(a.store, namespace=a.namespace)
    try:
        epoch = _bootstrap_store(cfg, store, feature_sets(info.kind, info.n_topics), info.kind, data / EVENTS_DIR, force=True)
    finally:
        store.close()
    if epoch is None:
        print("nothing to refill from: the data dir has no event log", file=sys.stderr)
        return 1
    print(epoch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
