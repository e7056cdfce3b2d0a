"""Static profile features and the PII guard, plus request-time features.

Profile features come from catalogue tables (users.parquet), not events. A column listed as
PII in dataset.json may feed a feature only through a coarsening transform (a zip code
becomes a one-digit region); a declaration that would copy raw PII into a feature value is
refused when the profile is built, before any value exists.

Request-time features depend on the request's time (an item's age): one function computes
them for training rows (at the label time) and for serving (at now).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from features.events import MS_PER_HOUR

__all__ = ["ProfileFeature", "ProfileSet", "PiiViolation", "build_profile", "item_age_hours", "profile_set_for", "COARSENING"]


class PiiViolation(ValueError):
    """A feature would carry a raw PII value."""


def _zip_region(col: pa.ChunkedArray) -> np.ndarray:
    s = [str(v) if v is not None else "" for v in col.to_pylist()]
    return np.asarray([int(z[0]) if z[:1].isdigit() and z.isdigit() else -1 for z in s], dtype=np.float64)


def _age_bucket(col: pa.ChunkedArray) -> np.ndarray:
    age = col.to_numpy(zero_copy_only=False).astype(np.float64)
    return np.digitize(age, [18, 25, 35, 45, 56]).astype(np.float64)


def _identity(col: pa.ChunkedArray) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False).astype(np.float64)


def _category(col: pa.ChunkedArray) -> np.ndarray:
    vals = [str(v) for v in col.to_pylist()]
    vocab = {v: i for i, v in enumerate(sorted(set(vals)))}
    return np.asarray([vocab[v] for v in vals], dtype=np.float64)


_TRANSFORMS = {"identity": _identity, "category": _category, "zip_region": _zip_region, "age_bucket": _age_bucket}
COARSENING = frozenset({"zip_region", "age_bucket"})  # transforms that may read a PII column


@dataclass(frozen=True)
class ProfileFeature:
    name: str
    column: str
    transform: str = "identity"
    default: float = -1.0

    def __post_init__(self) -> None:
        if self.transform not in _TRANSFORMS:
            raise ValueError(f"profile feature {self.name!r}: transform must be one of {sorted(_TRANSFORMS)}, got {self.transform!r}")


@dataclass(frozen=True)
class ProfileSet:
    name: str
    features: tuple[ProfileFeature, ...]

    def check_pii(self, pii_columns: Sequence[str]) -> None:
        for f in self.features:
            if f.column in pii_columns and f.transform not in COARSENING:
                raise PiiViolation(
                    f"profile feature {f.name!r} reads PII column {f.column!r} with transform {f.transform!r}; "
                    f"only a coarsening transform ({', '.join(sorted(COARSENING))}) may read PII"
                )


def build_profile(users: pa.Table, profile: ProfileSet, pii_fields: Mapping[str, Sequence[str]]) -> pa.Table:
    """user_id plus one float64 column per profile feature (nulls → default)."""
    profile.check_pii(list(pii_fields.get("users", [])))
    out = {"user_id": users.column("user_id")}
    for f in profile.features:
        if f.column not in users.column_names:
            raise ValueError(f"profile feature {f.name!r} needs users column {f.column!r}; have {users.column_names}")
        vals = _TRANSFORMS[f.transform](users.column(f.column))
        out[f"{profile.name}.{f.name}"] = pa.array(np.where(np.isfinite(vals), vals, f.default))
    return pa.table(out)


def profile_set_for(kind: str) -> ProfileSet:
    if kind == "movielens":
        return ProfileSet(
            "user_profile",
            (
                ProfileFeature("age_bucket", "age", "age_bucket"),
                ProfileFeature("gender", "gender", "category"),
                ProfileFeature("occupation", "occupation", "category"),
                ProfileFeature("region", "zip_code", "zip_region"),  # coarse: first zip digit
            ),
        )
    if kind == "simulated":
        return ProfileSet("user_profile", (ProfileFeature("region", "region"),))
    raise ValueError(f"unknown dataset kind {kind!r}; allowed: simulated, movielens")


def item_age_hours(publish_ts: np.ndarray, request_ts: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """(age in hours at request time, missing flag). Unknown publish time (<= 0) is missing
    (value 0); an item published after the request (clock skew) has age 0."""
    pub = np.asarray(publish_ts, dtype=np.int64)
    req = np.asarray(request_ts, dtype=np.int64)
    missing = np.broadcast_to(pub <= 0, np.broadcast_shapes(pub.shape, req.shape)).copy()
    age = np.maximum(req - pub, 0).astype(np.float64) / MS_PER_HOUR
    return np.where(missing, 0.0, age), missing
