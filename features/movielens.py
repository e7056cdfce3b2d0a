"""Import MovieLens 100K into a Parity data dir: a real, timestamped event log nobody here made up.

Licence: research use only, no redistribution. The raw files are only read, never copied;
the data dir this writes is derived data and must stay as local as the source.

Mapping (see features.datasets for the layout):

- u.data (``user \\t item \\t rating \\t unix-seconds``) -> one RATING event per line,
  ``value`` = rating, ``ts`` = seconds * 1000, ``event_id`` = line number (1-based, so
  re-imports give the same ids), ``topic`` = the item's first genre flag (0..18, -1 if
  none), ``creator_id`` = -1 and ``session_id`` = -1 (MovieLens has neither).
- u.item (``|``-separated, Latin-1) -> items.parquet: genres = every flag set, publish_ts =
  the release date at 00:00 UTC (0 when missing), duration_s and quality 0.0 (unknown).
- u.user -> users.parquet: age, gender, occupation, zip_code (PII: listed in
  dataset.json ``pii_fields`` and dropped by read_users unless asked), and region = the
  first digit of a numeric (US) zip code, -1 otherwise, a coarse non-identifying stand-in.
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from features.datasets import DatasetInfo, ITEMS_SCHEMA, ensure_new_data_dir, events_dir, write_catalogue
from features.eventlog import EventLog
from features.events import EventBatch, EventType

__all__ = ["import_movielens", "GENRES", "MovieLensFormatError"]

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_EPOCH = dt.date(1970, 1, 1)


class MovieLensFormatError(ValueError):
    """A MovieLens file does not have the documented format (names file and line)."""


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"MovieLens file {path} not found (expected the ml-100k directory with u.data, u.item, u.user)")
    # u.item holds Latin-1 titles; the other files are ASCII, which Latin-1 decodes identically.
    with open(path, encoding="latin-1", newline="") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


def _bad(path: Path, lineno: int, what: str) -> MovieLensFormatError:
    return MovieLensFormatError(f"{path.name} line {lineno}: {what}")


def _int(path: Path, lineno: int, field: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad(path, lineno, f"{field} {text!r} is not an integer") from None


def _release_ms(path: Path, lineno: int, text: str) -> int:
    """``01-Jan-1995`` -> ms at 00:00 UTC; empty -> 0. Parsed by hand: %b depends on locale."""
    if not text:
        return 0
    try:
        d, mon, y = text.split("-")
        date = dt.date(int(y), _MONTHS[mon], int(d))
    except (ValueError, KeyError):
        raise _bad(path, lineno, f"release date {text!r} is not dd-Mon-yyyy") from None
    return (date - _EPOCH).days * 86_400_000


def _region(zip_code: str) -> int:
    return int(zip_code[0]) if zip_code.isdigit() else -1


def _read_items(path: Path) -> pa.Table:
    ids, topics, genres, publish, titles = [], [], [], [], []
    for n, line in enumerate(_read_lines(path), 1):
        f = line.split("|")
        if len(f) != 5 + len(GENRES):
            raise _bad(path, n, f"expected {5 + len(GENRES)} '|'-separated fields, got {len(f)}")
        flags = f[5:]
        if any(x not in ("0", "1") for x in flags):
            raise _bad(path, n, "genre flags must be 0 or 1")
        g = [i for i, x in enumerate(flags) if x == "1"]
        ids.append(_int(path, n, "movie id", f[0]))
        titles.append(f[1])
        publish.append(_release_ms(path, n, f[2]))
        genres.append(g)
        topics.append(g[0] if g else -1)
    if not ids:
        raise MovieLensFormatError(f"{path.name} holds no items")
    k = len(ids)
    return pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "topic": pa.array(topics, pa.int32()),
            "creator_id": pa.array(np.full(k, -1, np.int64)),
            "duration_s": pa.array(np.zeros(k)),
            "quality": pa.array(np.zeros(k)),
            "publish_ts": pa.array(publish, pa.int64()),
            "genres": pa.array(genres, pa.list_(pa.int32())),
            "title": pa.array(titles, pa.string()),
        },
        schema=ITEMS_SCHEMA,
    )


def _read_users(path: Path) -> pa.Table:
    ids, ages, genders, occs, zips = [], [], [], [], []
    for n, line in enumerate(_read_lines(path), 1):
        f = line.split("|")
        if len(f) != 5:
            raise _bad(path, n, f"expected 5 '|'-separated fields, got {len(f)}")
        ids.append(_int(path, n, "user id", f[0]))
        ages.append(_int(path, n, "age", f[1]))
        genders.append(f[2])
        occs.append(f[3])
        zips.append(f[4])
    if not ids:
        raise MovieLensFormatError(f"{path.name} holds no users")
    return pa.table(
        {
            "user_id": pa.array(ids, pa.int64()),
            "age": pa.array(ages, pa.int32()),
            "gender": pa.array(genders, pa.string()),
            "occupation": pa.array(occs, pa.string()),
            "zip_code": pa.array(zips, pa.string()),
            "region": pa.array([_region(z) for z in zips], pa.int32()),
        }
    )


def _read_ratings(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    lines = _read_lines(path)
    m = len(lines)
    user = np.empty(m, np.int64)
    item = np.empty(m, np.int64)
    rating = np.empty(m, np.float64)
    secs = np.empty(m, np.int64)
    for n, line in enumerate(lines):
        f = line.split("\t")
        if len(f) != 4:
            raise _bad(path, n + 1, f"expected 4 tab-separated fields, got {len(f)}")
        try:
            user[n], item[n], rating[n], secs[n] = int(f[0]), int(f[1]), int(f[2]), int(f[3])
        except ValueError:
            raise _bad(path, n + 1, f"fields must be integers: {line!r}") from None
    if m == 0:
        raise MovieLensFormatError(f"{path.name} holds no ratings")
    bad = np.flatnonzero((rating < 1) | (rating > 5) | (secs < 0))
    if len(bad):
        raise _bad(path, int(bad[0]) + 1, "rating must be 1..5 and the timestamp >= 0")
    return user, item, rating, secs


def import_movielens(path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> DatasetInfo:
    """Import the ml-100k directory at ``path`` into a new data dir ``out_dir``."""
    src = Path(path)
    if not src.is_dir():
        raise FileNotFoundError(f"MovieLens directory {src} not found")
    items = _read_items(src / "u.item")
    users = _read_users(src / "u.user")
    user, item, rating, secs = _read_ratings(src / "u.data")

    item_ids = items.column("item_id").to_numpy()
    user_ids = users.column("user_id").to_numpy()
    for name, ids, col in (("u.item", item_ids, item), ("u.user", user_ids, user)):
        missing = np.setdiff1d(col, ids)
        if len(missing):
            raise MovieLensFormatError(f"u.data refers to ids missing from {name}: {missing[:5].tolist()}")
    order = np.argsort(item_ids)
    topic_of = items.column("topic").to_numpy()[order]
    topic = topic_of[np.searchsorted(item_ids[order], item)]

    m = len(user)
    ts = secs * 1000
    batch = EventBatch(
        event_id=np.arange(1, m + 1, dtype=np.int64),
        ts=ts,
        user_id=user,
        item_id=item,
        creator_id=np.full(m, -1, np.int64),
        topic=topic.astype(np.int32),
        session_id=np.full(m, -1, np.int64),
        type=np.full(m, int(EventType.RATING), np.int8),
        value=rating,
    )
    out = ensure_new_data_dir(out_dir)
    n_events = EventLog(events_dir(out)).append(batch)
    info = DatasetInfo(
        kind="movielens",
        seed=None,
        n_users=len(users),
        n_items=len(items),
        n_events=n_events,
        start_ts=int(ts.min()),
        end_ts=int(ts.max()) + 1,
        n_topics=len(GENRES),
        pii_fields={"users": ["zip_code"]},
        params={
            "source": "MovieLens 100K (GroupLens); research use only, no redistribution",
            "genres": list(GENRES),
            "rating_scale": [1, 5],
            "placeholders": {"duration_s": 0.0, "quality": 0.0, "creator_id": -1, "publish_ts_missing": 0},
        },
    )
    write_catalogue(out, items, users, info)
    return info
