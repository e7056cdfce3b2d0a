"""Parity's own models under MovieLens's published protocol (see models.protocol).

The training 80% becomes a data dir of its own (only those rating events), the pipeline's
two-tower and teacher are trained on it with the same code as a release, and every user
then ranks ALL unseen items: two-tower scores for the full catalogue, and the two-stage
path (200 two-tower candidates re-ranked by the teacher, the rest below them).
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from features.datasets import load_info, read_items, read_users, write_catalogue
from features.eventlog import EventLog
from features.pit import PitJoiner
from features.assemble import columns_from_join
from features.history import history_at
from models.data import build_training_data, feature_matrix
from models.protocol import full_ranking_metrics, protocol_baselines, protocol_split
from models.ranker import RankerConfig, predict, train_teacher
from models.two_tower import TwoTowerConfig, train_two_tower

__all__ = ["published_protocol"]


def published_protocol(data_dir: str | Path, release_dir: str | Path | None = None, *, seed: int = 0, profile: str = "small",
                       candidates: int = 200) -> dict[str, dict[str, float]]:
    info = load_info(data_dir)
    if info.kind != "movielens":
        raise ValueError(f"the published protocol is defined for MovieLens; {data_dir} holds {info.kind} data")
    events = EventLog(Path(data_dir) / "events").read(must_exist=True).deduplicated()
    split = protocol_split(events, seed)
    out = protocol_baselines(split, seed)
    with tempfile.TemporaryDirectory(prefix="parity-protocol-") as tmp:
        d = Path(tmp) / "train80"
        users = read_users(data_dir)
        sub = dataclasses.replace(info, n_events=len(split.train_events), params={**info.params, "protocol": "random 80/20 of ratings >= 4"})
        EventLog(d / "events").append(split.train_events)
        write_catalogue(d, read_items(data_dir), users, dataclasses.replace(sub, pii_fields={"users": []}))
        td = build_training_data(d, seed=seed, history_len=TwoTowerConfig.for_profile(profile).history_len)
        tt = train_two_tower(td, TwoTowerConfig.for_profile(profile), seed)
        teacher = train_teacher(td, RankerConfig.for_profile(profile), seed)
        t_end = int(split.train_events.ts.max()) + 1
        joiner = PitJoiner(list(td.sets), td.events)
        uids = split.user_ids
        ucols = columns_from_join(joiner.join(pa.table({"user_id": uids, "ts": np.full(len(uids), t_end)}), only=[td.inputs.user_set]),
                                 [fs for fs in td.sets if fs.name == td.inputs.user_set])
        U = np.stack([np.where(ucols[c][1], np.nan, ucols[c][0]) for c in tt.user_columns], axis=1).astype(np.float32)
        H = history_at(td.events, td.info.kind, uids, t_end, tt.config.history_len)
        ue = tt.user_embeddings(U, H)
        ie = tt.item_embeddings(split.item_ids, td.items)
        tower = ue @ ie.T
        out["parity_two_tower"] = full_ranking_metrics(split, lambda ub: tower[ub])
        seen = [set() for _ in range(len(uids))]
        for u, i in zip(split.train_u.tolist(), split.train_i.tolist()):
            seen[u].add(i)

        def two_stage(ub: np.ndarray) -> np.ndarray:
            s = tower[ub].copy()
            for r, u in enumerate(ub.tolist()):
                s[r, list(seen[u])] = -np.inf
            top = np.argsort(-s, axis=1)[:, :candidates]
            X = feature_matrix(td.inputs, joiner, list(td.sets), td.items, np.repeat(uids[ub], candidates), split.item_ids[top.reshape(-1)], t_end)
            p = predict(teacher, X).reshape(len(ub), candidates)
            full = np.full(s.shape, -1e9)
            np.put_along_axis(full, top, 1.0 + p, axis=1)  # candidates above everything else
            return full

        out["parity_two_stage"] = full_ranking_metrics(split, two_stage)
    return out
