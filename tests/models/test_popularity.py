"""popularity_at (one pass for many as-of times) orders items as popularity() does at each time."""
from __future__ import annotations

import numpy as np

from features.eventlog import EventLog
from models.popularity import popularity, popularity_at


def test_popularity_at_many_times_is_popularity_at_each(small_sim):
    ev = EventLog(small_sim / "events").read(must_exist=True).deduplicated()
    times = np.r_[np.random.default_rng(0).choice(ev.ts, 12), ev.ts.min(), ev.ts.max() + 1]
    for half in (None, 3 * 3_600_000):
        got = popularity_at(ev, "simulated", times, half_life_ms=half)
        assert sorted(got) == sorted(set(times.tolist()))
        for t in times.tolist():
            want = popularity(ev, "simulated", t, half_life_ms=half)[0]
            assert got[t].tolist() == want.tolist()
    assert popularity_at(ev, "simulated", times[:1], n=5)[int(times[0])].tolist() == popularity(ev, "simulated", int(times[0]))[0][:5].tolist()
