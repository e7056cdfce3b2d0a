"""Event-log benchmarks: what verifying every part's checksum adds to a read.

Every read hashes the parts it opens (features/part_checksum.py): the figure that says this is
cheap is the ratio of hashing alone to a whole read, both measured here in the same run on the
benchmark's ~1M-event log.
"""
from __future__ import annotations

import pytest

from features.datasets import events_dir
from features.eventlog import EventLog


@pytest.mark.benchmark(group="eventlog")
def test_eventlog_read(benchmark, dataset) -> None:
    log = EventLog(events_dir(dataset.dir))
    benchmark.extra_info.update(unit="events", work=len(dataset.events))
    events = benchmark.pedantic(log.read, rounds=5, iterations=1)
    assert len(events) == len(dataset.events)


@pytest.mark.benchmark(group="eventlog")
def test_eventlog_verify_checksums_only(benchmark, dataset) -> None:
    log = EventLog(events_dir(dataset.dir))
    parts = [p for _, p in log.parts()]
    assert log.requires_checksums and parts
    benchmark.extra_info.update(unit="events", work=len(dataset.events), baseline="test_eventlog_read", parts=len(parts))
    checks = benchmark.pedantic(log._verify, args=(parts,), rounds=5, iterations=1)
    assert len(checks) == len(parts) and all(c.matches for c in checks.values())
