"""pipeline.protocol_eval's study options: the diagnostics (is it retrieval or the re-ranking) and
the item-item quota of the candidate lists."""
from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from pipeline.protocol_eval import published_protocol


def test_an_item_item_quota_outside_the_budget_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="n_item_item"):
        published_protocol(tmp_path, candidates=100, n_item_item=101)
    with pytest.raises(ValueError, match="n_item_item"):
        published_protocol(tmp_path, n_item_item=-1)


def test_the_diagnostics_rank_the_same_lists_three_ways(movielens_dir, tmp_path):
    """Tiny profile, validation holdout: with diagnostics the result also holds the lists' recall of
    the held-out items and the lists in the tower's and the item-item model's order; the default
    figures are unchanged by asking for them, and a quota makes longer item-item shares."""
    from features.movielens import import_movielens

    import_movielens(movielens_dir, tmp_path / "ml")
    res = published_protocol(tmp_path / "ml", profile="tiny", holdout="valid", diagnostics=True, n_item_item=50)
    ranked = {"popularity", "mf_als", "parity_two_tower", "parity_two_stage", "parity_two_stage_teacher", "parity_item_item",
              "parity_two_stage_item_item", "parity_lists_tower_order", "parity_lists_item_item_order"}
    assert set(res) == ranked | {"parity_lists_recall"}
    users = res["mf_als"]["users"]
    assert all(res[k]["users"] == users and 0 <= res[k]["ndcg@10"] <= 1 for k in ranked)
    assert 0 < res["parity_lists_recall"]["recall@list"] <= 1 and res["parity_lists_recall"]["mean_len"] > 50
    plain = published_protocol(tmp_path / "ml", profile="tiny", holdout="valid", n_item_item=50)
    assert set(plain) == ranked - {"parity_lists_tower_order", "parity_lists_item_item_order"}
    assert all(plain[k] == res[k] for k in plain)
