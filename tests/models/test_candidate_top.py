"""The candidate builder's per-user top-k equals a stable full sort, ties included."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.candidates import top_stable


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([-1.5, 0.0, 0.25, 0.25, 2.0, 7.0]) | st.floats(-5, 5, width=32), min_size=0, max_size=80),
       st.integers(-2, 100))
def test_top_stable_is_the_stable_sorts_prefix(values, k):
    s = np.asarray(values, dtype=np.float32)
    want = np.argsort(-s, kind="stable")[: max(k, 0)]
    assert np.array_equal(top_stable(s, k), want)


def test_ties_at_the_cut_go_to_the_lower_index():
    s = np.asarray([1.0, 3.0, 2.0, 2.0, 2.0, 0.5], dtype=np.float32)
    assert top_stable(s, 3).tolist() == [1, 2, 3]
