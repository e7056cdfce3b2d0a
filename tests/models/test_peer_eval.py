"""Peers on Parity's own splits (pipeline.peers, `parity eval --peers`): eval's popularity to the
last digit, settings chosen without reading the test part, both protocols, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("implicit", reason="the peers need the eval extra (pip install .[eval])")

from export.release import load_release  # noqa: E402
from features.catalog import ItemCatalog  # noqa: E402
from features.datasets import load_info, read_items  # noqa: E402
from features.eventlog import EventLog  # noqa: E402
from features.events import EventBatch, EventType  # noqa: E402
from models.protocol import protocol_baselines, protocol_split  # noqa: E402
from pipeline.evaluate import evaluate_release  # noqa: E402
from pipeline.peers import protocol_peers_of, time_split_peers, time_split_peers_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# Small grids (two points or more per peer, so a choice is made) keep these tests quick.
TINY = {
    "itemknn": [{"weighting": "cosine", "K": (5, 20)}],
    "ease": [{"lambda": (1.0, 10.0, 100.0)}],
    "als": [{"factors": 4, "regularization": r, "alpha": 5.0, "iterations": (5, 15)} for r in (0.1, 1.0)],
    "bpr": [{"factors": 8, "learning_rate": lr, "regularization": 0.01, "iterations": (20, 50)} for lr in (0.01, 0.05)],
}


def _settings(res: dict) -> dict:
    return {k: v["settings"] for k, v in res["peers"].items()}


def _read(data_dir: Path):
    events = EventLog(data_dir / "events").read(must_exist=True).deduplicated()
    return load_info(data_dir).kind, events, ItemCatalog.from_table(read_items(data_dir))


def test_the_time_split_popularity_is_evals_to_the_last_digit(release_dir, small_sim):
    ev = evaluate_release(release_dir, small_sim)
    peers = time_split_peers(release_dir, small_sim, grids={"ease": TINY["ease"]})
    assert peers["users"] == ev.users
    assert peers["peers"]["popularity"]["ndcg@10"] == ev.two_stage["popularity"]["ndcg@10"]
    assert peers["peers"]["popularity"]["recall@10"] == ev.two_stage["popularity"]["recall@10"]
    sample = time_split_peers(release_dir, small_sim, max_users=10, seed=4, grids={})
    ev10 = evaluate_release(release_dir, small_sim, max_users=10, seed=4)
    assert sample["users"] == ev10.users == 10
    assert sample["peers"]["popularity"]["ndcg@10"] == ev10.two_stage["popularity"]["ndcg@10"]


def test_time_split_settings_do_not_depend_on_the_test_part(release_dir, small_sim):
    rel = load_release(release_dir)
    kind, events, items = _read(small_sim)
    base = time_split_peers_of(rel, kind, events, items, grids=TINY)
    # Move every session that starts at or after the test start onto other items: the test
    # part's truth changes, nothing before the test start does.
    test_start = int(rel.manifest["training_data"]["split_ts"][1])
    first = {}
    for s, t in zip(events.session_id.tolist(), events.ts.tolist()):
        first[s] = min(t, first.get(s, t))
    late = np.fromiter((first[s] >= test_start for s in events.session_id.tolist()), dtype=bool, count=len(events))
    assert late.any() and (~late).any()
    ids = np.sort(items.item_id)
    moved = ids[(np.searchsorted(ids, events.item_id) + 7) % len(ids)]
    changed = EventBatch(**{**{f: getattr(events, f) for f in events.__dataclass_fields__},
                            "item_id": np.where(late, moved, events.item_id)})
    other = time_split_peers_of(rel, kind, changed, items, grids=TINY)
    assert _settings(other) == _settings(base)
    assert {k: v["valid_ndcg@10"] for k, v in other["peers"].items() if k != "popularity"} == \
           {k: v["valid_ndcg@10"] for k, v in base["peers"].items() if k != "popularity"}
    assert any(other["peers"][k]["ndcg@10"] != base["peers"][k]["ndcg@10"] for k in base["peers"])


def _ratings(seed: int = 0, users: int = 120, items: int = 40) -> EventBatch:
    """Two taste groups over `items`, ratings 5 (liked) and 2 (not); one extra user rates every
    item 2 so the item set stays the same whatever the positives are."""
    rng = np.random.default_rng(seed)
    u, i, v = [], [], []
    for user in range(users):
        own = np.arange(items // 2) + (0 if user < users // 2 else items // 2)
        liked = rng.choice(own, 8, replace=False)
        disliked = rng.choice(np.setdiff1d(np.arange(items), own), 3, replace=False)
        for x, r in [(x, 5.0) for x in liked] + [(x, 2.0) for x in disliked]:
            u.append(user), i.append(int(x)), v.append(r)
    for x in range(items):
        u.append(users), i.append(x), v.append(2.0)
    n = len(u)
    z = np.zeros(n, dtype=np.int64)
    return EventBatch(np.arange(n), 1_000_000 + np.arange(n) * 1000, np.array(u), np.array(i), z, z, z,
                      np.full(n, int(EventType.RATING)), np.array(v))


def test_protocol_settings_do_not_depend_on_the_test_positives():
    events = _ratings()
    base = protocol_peers_of(events, seed=0, grids=TINY)
    split = protocol_split(events, 0)
    test_pairs = set(zip(split.user_ids[split.test_u].tolist(), split.item_ids[split.test_i].tolist()))
    rated: dict[int, set[int]] = {}
    for uu, ii in zip(events.user_id.tolist(), events.item_id.tolist()):
        rated.setdefault(uu, set()).add(ii)
    item = events.item_id.copy()
    for r, (uu, ii, vv) in enumerate(zip(events.user_id.tolist(), events.item_id.tolist(), events.value.tolist())):
        if vv >= 4 and (uu, ii) in test_pairs:  # a test positive moves to an item the user never rated
            j = next(x for x in range(40) if x not in rated[uu])
            rated[uu].add(j)
            item[r] = j
    changed = EventBatch(**{**{f: getattr(events, f) for f in events.__dataclass_fields__}, "item_id": item})
    again = protocol_split(changed, 0)
    np.testing.assert_array_equal(again.train_i, split.train_i)  # the training part is the same
    other = protocol_peers_of(changed, seed=0, grids=TINY)
    assert _settings(other) == _settings(base)
    assert any(other["peers"][k]["ndcg@10"] != base["peers"][k]["ndcg@10"] for k in base["peers"])


def test_protocol_peers_learn_the_groups_and_popularity_is_the_protocols():
    events = _ratings(seed=1)
    res = protocol_peers_of(events, seed=0, grids=TINY)
    pop = protocol_baselines(protocol_split(events, 0), 0)["popularity"]
    assert res["peers"]["popularity"]["ndcg@10"] == pop["ndcg@10"] and res["users"] == pop["users"]
    for name in TINY:  # tastes by group: every peer well above popularity
        assert res["peers"][name]["ndcg@10"] > pop["ndcg@10"] + 0.1, (name, res["peers"][name])
        assert res["peers"][name]["grid_points"] >= 2


def test_the_same_seed_gives_the_same_peer_figures():
    events = _ratings(seed=2)
    a = protocol_peers_of(events, seed=3, grids=TINY)
    b = protocol_peers_of(events, seed=3, grids=TINY)
    assert {k: (v["ndcg@10"], v["settings"]) for k, v in a["peers"].items()} == \
           {k: (v["ndcg@10"], v["settings"]) for k, v in b["peers"].items()}


def test_eval_peers_prints_the_peers_beside_paritys_models(release_dir, small_sim, monkeypatch, capsys):
    import pipeline.peers
    from parity.cli import main

    monkeypatch.setattr(pipeline.peers, "GRIDS", TINY)
    assert main(["eval", "--release", str(release_dir), "--events", str(small_sim), "--peers"]) == 0
    text = capsys.readouterr().out
    out = json.loads(text.strip().splitlines()[-1])
    peers = out["peers"]["time_split"]["peers"]
    assert set(peers) == {"popularity", *TINY}
    assert peers["ease"]["settings"]["lambda"] in (1.0, 10.0, 100.0)
    assert "parity student_int8" in text and "peers on the held-out slice" in text


def test_eval_peers_without_implicit_names_the_flag_and_the_extra(release_dir, small_sim):
    code = ("import sys; sys.modules['implicit'] = None\nfrom parity.cli import main\n"
            f"sys.exit(main(['eval', '--release', {str(release_dir)!r}, '--events', {str(small_sim)!r}, '--peers']))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "--peers" in p.stderr and "pip install .[eval]" in p.stderr
    assert p.stdout == ""  # refused before any work
