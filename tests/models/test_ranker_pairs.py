"""pipeline.ranker_pairs: the second ranker pair trained in a child process is the pair this
process would have trained (same weights), and a child that fails is reported, not ignored."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.ranker import RankerConfig, predict
from pipeline.ranker_pairs import RankerRows, train_pair, train_two_pairs


@pytest.fixture(scope="module")
def tiny_td(tmp_path_factory: pytest.TempPathFactory):
    from features.simulator import simulate
    from models.data import build_training_data

    out = tmp_path_factory.mktemp("pairs") / "data"
    simulate(out, users=300, items=80, days=5, seed=1)
    return build_training_data(out)


def _half_columns(td):
    keep = list(range(0, len(td.columns), 2))
    cut = lambda s: dataclasses.replace(s, X=np.ascontiguousarray(s.X[:, keep]))  # noqa: E731
    return RankerRows(cut(td.train), cut(td.valid), tuple(td.columns[j] for j in keep))


def test_the_pair_trained_in_a_child_process_equals_the_one_trained_here(tiny_td):
    cfg = RankerConfig.for_profile("tiny").replace(max_epochs=2)
    b = _half_columns(tiny_td)
    (ta, sa), (tb, sb) = train_two_pairs(tiny_td, b, cfg, seed=3, parallel=True)
    (ta2, sa2), (tb2, sb2) = train_pair(tiny_td, cfg, 3), train_pair(b, cfg, 3)
    for got, want, X in ((ta, ta2, tiny_td.valid.X), (sa, sa2, tiny_td.valid.X), (tb, tb2, b.valid.X), (sb, sb2, b.valid.X)):
        np.testing.assert_array_equal(predict(got, X), predict(want, X))
    assert tb.columns == b.columns and sb.fit_info.n_train_rows == len(b.train)


def test_a_failing_child_raises_with_its_error(tiny_td):
    bad = RankerRows(tiny_td.train, dataclasses.replace(tiny_td.valid, X=tiny_td.valid.X[:0], label=tiny_td.valid.label[:0]),
                     tuple(tiny_td.columns))
    with pytest.raises(RuntimeError, match="validation split is empty|valid split is empty"):
        train_two_pairs(tiny_td, bad, RankerConfig.for_profile("tiny").replace(max_epochs=1), seed=0, parallel=True)


def test_small_data_trains_both_pairs_here(tiny_td, monkeypatch):
    import pipeline.ranker_pairs as rp

    monkeypatch.setattr(rp.subprocess, "Popen", lambda *a, **k: pytest.fail("no child below PARALLEL_MIN_ROWS"))
    assert len(tiny_td.train) < rp.PARALLEL_MIN_ROWS
    cfg = RankerConfig.for_profile("tiny").replace(max_epochs=1)
    (_, s), (_, s2) = train_two_pairs(tiny_td, tiny_td, cfg, seed=0)
    np.testing.assert_array_equal(predict(s, tiny_td.valid.X), predict(s2, tiny_td.valid.X))


def test_a_child_whose_parent_dies_stops(tiny_td, tmp_path):
    """kill -9 of the training process must not leave its second pair training for nobody."""
    import os
    import pickle
    import signal
    import subprocess
    import sys
    import time

    cfg = RankerConfig.for_profile("tiny").replace(max_epochs=10_000, patience=10_000)
    with open(tmp_path / "in.pkl", "wb") as f:
        pickle.dump((RankerRows.of(tiny_td), cfg, 0), f)
    parent = subprocess.Popen(["bash", "-c", f'"{sys.executable}" -m pipeline.ranker_pairs "{tmp_path}" & echo $! ; wait'],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(3.0)
    os.kill(child, 0)  # still training
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as st:
            if st.read().split()[2] == "Z":  # exited, not yet reaped by its new parent
                break
        time.sleep(0.2)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child kept training after its parent died")
    assert not (tmp_path / "out.pkl").exists()
