"""The backtest's fixtures: one Replay of the session's tiny release on the small simulated data
(tests/conftest.py trains it once; nothing here trains)."""
from __future__ import annotations

import pytest

from backtest.replay import Replay


@pytest.fixture(scope="module")
def replay(release_dir, small_sim) -> Replay:
    """The whole held-out slice (the eval's 27 users), every condition's server config default but
    the per-creator cap, which is 0 as parity eval ranks."""
    return Replay(release_dir, small_sim)
