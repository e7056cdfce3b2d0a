"""Ranker inputs written a block at a time (`features.assemble.Block`) are the same matrix, bit
for bit, as the same inputs given column by column: one definition of the ranker's raw inputs."""
from __future__ import annotations

import numpy as np
import pytest

from features.assemble import Block, RankerInputs, assemble


def _spec() -> RankerInputs:
    user = [f"u.a{i}" for i in range(3)] + [f"u.aff[{d}]" for d in range(4)]
    return RankerInputs("u", "i", (("p", "topic"),), "u.aff",
                        tuple(user + ["i.x", "i.y", "i.z", "p.c", "p.d", "retrieval.rank", "cross.topic_affinity", "request.item_age_h",
                                      "item.duration_s"]))


def _inputs(rng: np.random.Generator, n: int):
    user = {f"u.a{i}": (np.array([rng.normal()]), np.array([rng.random() < 0.3])) for i in range(3)}
    aff_missing = np.array([rng.random() < 0.3])
    user.update({f"u.aff[{d}]": (np.array([rng.random()]), aff_missing) for d in range(4)})
    per_row = {c: (rng.normal(size=n) * 1e3, rng.random(n) < 0.25) for c in ("i.x", "i.y", "i.z", "p.c", "p.d", "retrieval.rank")}
    per_row["i.y"][0][:2] = np.nan  # a NaN value that is not missing stays NaN
    items = dict(item_topic=rng.integers(-1, 6, n), item_publish_ts=rng.integers(-5, 10**12, n), item_duration_s=rng.normal(size=n) * 100,
                 request_ts=10**12)
    return user, per_row, items


@pytest.mark.parametrize("n", [1, 2, 37])
def test_blocks_give_the_matrix_the_columns_give(n):
    rng = np.random.default_rng(n)
    spec = _spec()
    user, per_row, items = _inputs(rng, n)
    want = assemble(spec, {**user, **per_row}, **items)
    names = tuple(user)
    ub = Block.of(names, np.concatenate([user[c][0] for c in names]), np.concatenate([user[c][1] for c in names]))
    ib = Block.of(("i.x", "i.y", "i.z", "i.unused"), np.stack([per_row[c][0] for c in ("i.x", "i.y", "i.z", "i.z")], axis=1),
                  np.stack([per_row[c][1] for c in ("i.x", "i.y", "i.z", "i.z")], axis=1))  # a column the ranker does not read
    pb = Block.of(("p.d", "p.c"), np.stack([per_row["p.d"][0], per_row["p.c"][0]], axis=1),
                  np.stack([per_row["p.d"][1], per_row["p.c"][1]], axis=1))  # in another order than the ranker's
    got = assemble(spec, {**user, "retrieval.rank": per_row["retrieval.rank"]}, **items, blocks=[ub, ib, pb])
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


def test_a_derived_column_is_computed_even_when_a_block_holds_its_name():
    rng = np.random.default_rng(0)
    spec = _spec()
    user, per_row, items = _inputs(rng, 5)
    want = assemble(spec, {**user, **per_row}, **items)
    fake = Block(("item.duration_s", "i.x"), np.stack([np.full(5, 7.0), np.where(per_row["i.x"][1], np.nan, per_row["i.x"][0])],
                                                       axis=1).astype(np.float32))
    got = assemble(spec, {**user, **per_row}, **items, blocks=[fake])
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


def test_an_input_in_no_block_and_no_column_is_named():
    rng = np.random.default_rng(1)
    user, per_row, items = _inputs(rng, 4)
    del per_row["p.d"]
    with pytest.raises(KeyError, match="p.d"):
        assemble(_spec(), {**user, **per_row}, **items)
