"""PII never becomes a feature value; request-time features are one shared function."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from features.datasets import load_info, read_users
from features.events import MS_PER_HOUR
from features.movielens import import_movielens
from features.profile import PiiViolation, ProfileFeature, ProfileSet, build_profile, item_age_hours, profile_set_for


def test_a_raw_pii_column_cannot_become_a_feature():
    users = pa.table({"user_id": [1], "zip_code": ["12345"]})
    bad = ProfileSet("p", (ProfileFeature("zip", "zip_code", "identity"),))
    with pytest.raises(PiiViolation, match="zip_code"):
        build_profile(users, bad, {"users": ["zip_code"]})


def test_movielens_profile_keeps_only_a_coarse_region_from_the_zip_code(movielens_dir, tmp_path):
    out = tmp_path / "ml"
    import_movielens(movielens_dir, out)
    info = load_info(out)
    assert "zip_code" in info.pii_fields["users"]
    assert "zip_code" not in read_users(out).column_names  # dropped unless asked for
    users = read_users(out, include_pii=True)
    prof = build_profile(users, profile_set_for("movielens"), info.pii_fields)
    region = prof["user_profile.region"].to_numpy()
    assert set(np.unique(region)) <= set(range(-1, 10))
    zips = {z for z in users["zip_code"].to_pylist()}
    for col in prof.column_names[1:]:
        assert not ({str(int(v)) for v in prof[col].to_numpy()} & zips), f"{col} leaks zip codes"


def test_item_age_is_hours_since_publish_with_unknown_publish_missing():
    age, missing = item_age_hours(np.array([0, 1_000, 5 * MS_PER_HOUR + 1_000]), 5 * MS_PER_HOUR + 1_000)
    assert age.tolist() == [0.0, 5.0, 0.0]
    assert missing.tolist() == [True, False, False]
    age, _ = item_age_hours(np.array([10 * MS_PER_HOUR]), np.array([MS_PER_HOUR, 12 * MS_PER_HOUR]))
    assert age.tolist() == [0.0, 2.0]
