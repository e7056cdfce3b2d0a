"""The release's drift reference describes what serving samples: candidate rows by the server's
rule, drawn uniformly per request, scored by the student; raw samples live in reference.npz."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.reference import SAMPLE_FILE, attach_samples, build_reference, release_reference
from export.release import load_release


def test_a_trained_release_carries_a_served_candidate_reference_with_its_samples_in_a_file(release_dir: Path):
    rel = load_release(release_dir)
    ref = rel.manifest["reference"]
    pop = ref["population"]
    assert pop["rows"] == "served_candidates" and pop["per_request"] == 8
    assert pop["n"] == pop["requests"] * 8 or pop["n"] <= pop["requests"] * 8  # a list shorter than 8 gives fewer
    assert SAMPLE_FILE in rel.meta.files and ref["samples"]["file"] == SAMPLE_FILE
    assert all("sample" not in h for h in ref["features"].values()) and "sample" not in ref["prediction"]
    assert (release_dir / "manifest.json").stat().st_size < 120_000  # the raw samples are not in the manifest
    full = release_reference(rel)
    sampled = ref["samples"]["columns"]
    assert sampled and all(len(full["features"][c]["sample"]) >= 2 for c in sampled)
    assert all("sample" not in full["features"][c] for c in full["features"] if c not in sampled)
    assert not any(full["features"][c].get("discrete") for c in sampled)  # counts are tested with chi-square, never KS
    assert len(full["prediction"]["sample"]) == min(pop["n"], ref["samples"]["size"])
    assert full["features"][sampled[0]]["edges"] == ref["features"][sampled[0]]["edges"]


def test_served_rows_sample_the_servers_candidate_union_and_score_them_with_the_student(release_dir: Path, small_sim: Path):
    from export.candidates import SOURCES
    from export.reference import request_times, served_rows
    from export.runtime import ReleaseRuntime
    from features.catalog import ItemCatalog
    from features.datasets import load_info, read_items
    from features.eventlog import EventLog
    from features.pit import PitJoiner
    from features.repo import feature_sets

    rel = load_release(release_dir)
    rt = ReleaseRuntime.load(rel, rankers=("student_int8",))
    info = load_info(small_sim)
    sets = {fs.name: fs for fs in feature_sets(info.kind, info.n_topics)}
    used = [sets[n] for n in rt.inputs.sets]
    events = EventLog(small_sim / "events").read(must_exist=True).deduplicated()
    items = ItemCatalog.from_table(read_items(small_sim))
    users, ts = request_times(events, int(events.ts.min()), int(events.ts.max()) + 1, 40, seed=1)
    assert len(users) == len(np.unique(users)) == 40
    r = served_rows(rt, PitJoiner(used, events), used, sets[rt.inputs.user_set], events, info.kind, items, users, ts, seed=2)
    per = np.bincount(r["request"], minlength=len(r["users"]))
    assert per.max() == 8 and (per <= np.minimum(8, r["n_candidates"])).all()
    assert {SOURCES[int(s)] for s in r["sources"]} <= set(SOURCES)
    np.testing.assert_allclose(r["scores"], rt.score(r["X"]), rtol=0, atol=0)
    assert r["X"].shape == (int(per.sum()), len(rt.inputs.columns))
    again = served_rows(rt, PitJoiner(used, events), used, sets[rt.inputs.user_set], events, info.kind, items, users, ts, seed=2)
    np.testing.assert_array_equal(np.nan_to_num(again["X"], nan=-7), np.nan_to_num(r["X"], nan=-7))  # seeded: a replay logs the same rows


def test_old_releases_with_inline_samples_read_as_before():
    rng = np.random.default_rng(0)
    X = np.c_[rng.normal(size=500), rng.integers(0, 5, 500)].astype(np.float32)
    ref, arrays = build_reference(X, ["x", "n"], rng.random(500), population={"rows": "test"}, sample=100)
    assert ref["samples"]["columns"] == ["x"]  # the count column keeps no sample
    back = attach_samples(ref, arrays)
    assert len(back["features"]["x"]["sample"]) == 100 and "sample" not in back["features"]["n"]
    assert len(back["prediction"]["sample"]) == 100
    assert "sample" not in ref["features"]["x"]  # attach_samples copies; the manifest's reference is untouched
    assert json.loads(json.dumps(ref)) == ref  # the manifest part is plain JSON


def test_release_reference_keeps_inline_samples_of_an_older_manifest():
    class Old:
        manifest = {"reference": {"features": {"x": {"edges": [0.0], "shares": [0.5, 0.5], "missing_rate": 0.0, "sample": [1.0, -1.0]}},
                                  "prediction": {"edges": [0.5], "shares": [0.5, 0.5], "missing_rate": 0.0}}}

    assert release_reference(Old())["features"]["x"]["sample"] == [1.0, -1.0]

    class NoRef:
        manifest = {}

    assert release_reference(NoRef()) is None
