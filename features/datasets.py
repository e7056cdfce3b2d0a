"""The on-disk layout of a data dir: an event log plus the catalogue tables that describe it.

A data dir DIR holds:

- ``DIR/events/``: the event log (see features.eventlog), Parquet, hive-partitioned by UTC day.
- ``DIR/items.parquet``: the item catalogue (ITEMS_SCHEMA).
- ``DIR/users.parquet``: one row per user: ``user_id`` plus attributes that depend on the
  source (simulated: region, signup_ts; MovieLens: age, gender, occupation, zip_code, region).
- ``DIR/dataset.json``: what made the dir (DatasetInfo), written last, so a dir without it is
  an incomplete import and is refused by load_info.

Columns that hold personal data are listed in ``dataset.json`` under ``pii_fields`` and
read_users drops them unless asked, so the default read path never carries PII into
features, models or logs.

Item columns with no source value are filled, never NaN/null, so every consumer can rely on
the schema: MovieLens has no duration or latent quality (both 0.0), no creator (-1) and some
films have no release date (publish_ts 0).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.atomic import write_atomic

__all__ = [
    "DatasetInfo",
    "ITEMS_SCHEMA",
    "EVENTS_DIR",
    "ITEMS_FILE",
    "USERS_FILE",
    "INFO_FILE",
    "KINDS",
    "events_dir",
    "load_info",
    "read_items",
    "read_users",
    "write_catalogue",
    "ensure_new_data_dir",
]

EVENTS_DIR = "events"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
INFO_FILE = "dataset.json"
KINDS = ("simulated", "movielens")

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("topic", pa.int32(), nullable=False),  # -1: unknown
        pa.field("creator_id", pa.int64(), nullable=False),  # -1: unknown
        pa.field("duration_s", pa.float64(), nullable=False),  # 0.0: unknown (MovieLens)
        pa.field("quality", pa.float64(), nullable=False),  # simulated latent quality in [0, 1]; 0.0: unknown
        pa.field("publish_ts", pa.int64(), nullable=False),  # ms since epoch, UTC; 0: unknown
        pa.field("genres", pa.list_(pa.int32()), nullable=False),  # topic ids
        pa.field("title", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a data dir holds and how it was made (the contents of dataset.json).

    ``start_ts``/``end_ts`` bound the covered period in ms: every event has
    ``start_ts <= ts < end_ts``. ``seed`` is None for imported (non-simulated) data.
    """

    kind: str
    seed: int | None
    n_users: int
    n_items: int
    n_events: int
    start_ts: int
    end_ts: int
    n_topics: int
    pii_fields: Mapping[str, list[str]] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"dataset kind must be one of {KINDS}, got {self.kind!r}")
        if self.end_ts < self.start_ts:
            raise ValueError(f"dataset end_ts {self.end_ts} precedes start_ts {self.start_ts}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["pii_fields"] = {k: list(v) for k, v in self.pii_fields.items()}
        d["params"] = dict(self.params)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str = INFO_FILE) -> "DatasetInfo":
        names = [f for f in cls.__dataclass_fields__]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"{source} lacks keys {missing}")
        kw = {n: d[n] for n in names}
        kw["pii_fields"] = {str(k): [str(c) for c in v] for k, v in (d["pii_fields"] or {}).items()}
        return cls(**kw)


def events_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Where a data dir keeps its event log."""
    return Path(data_dir) / EVENTS_DIR


def _require_file(data_dir: Path, name: str) -> Path:
    p = data_dir / name
    if not p.is_file():
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data dir {data_dir} does not exist")
        raise FileNotFoundError(
            f"{p} not found: {data_dir} is not a complete data dir (expected {INFO_FILE}, "
            f"{ITEMS_FILE}, {USERS_FILE} and {EVENTS_DIR}/; make one with the simulator or the MovieLens import)"
        )
    return p


def load_info(data_dir: str | os.PathLike[str]) -> DatasetInfo:
    """Read dataset.json; a clear error names the missing or malformed file."""
    p = _require_file(Path(data_dir), INFO_FILE)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p} must hold a JSON object")
    return DatasetInfo.from_json(d, source=str(p))


def read_items(data_dir: str | os.PathLike[str]) -> pa.Table:
    """The item catalogue, cast to ITEMS_SCHEMA."""
    p = _require_file(Path(data_dir), ITEMS_FILE)
    return pq.read_table(p).cast(ITEMS_SCHEMA)


def read_users(data_dir: str | os.PathLike[str], include_pii: bool = False) -> pa.Table:
    """The user table. PII columns (per dataset.json) are dropped unless include_pii."""
    data_dir = Path(data_dir)
    info = load_info(data_dir)
    p = _require_file(data_dir, USERS_FILE)
    table = pq.read_table(p)
    if not include_pii:
        drop = [c for c in info.pii_fields.get("users", []) if c in table.column_names]
        if drop:
            table = table.drop_columns(drop)
    return table


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd"))


def _write_text_atomic(text: str, path: Path) -> None:
    write_atomic(path, lambda f: f.write(text), binary=False)


def _json_default(o: Any) -> Any:
    # numpy scalars and arrays end up in params; store them as plain JSON numbers/lists.
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in {INFO_FILE}")


def write_catalogue(data_dir: str | os.PathLike[str], items: pa.Table, users: pa.Table, info: DatasetInfo) -> None:
    """Write items.parquet, users.parquet and (last) dataset.json.

    Validates the tables against the layout so a bad import fails here, not in a consumer.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    missing = [f.name for f in ITEMS_SCHEMA if f.name not in items.column_names]
    if missing:
        raise ValueError(f"items table lacks columns {missing}")
    items = items.select([f.name for f in ITEMS_SCHEMA]).cast(ITEMS_SCHEMA)
    if "user_id" not in users.column_names:
        raise ValueError("users table lacks column 'user_id'")
    if users.schema.field("user_id").type != pa.int64():
        users = users.set_column(users.column_names.index("user_id"), "user_id", users.column("user_id").cast(pa.int64()))
    for table, name, key in ((items, "items", "item_id"), (users, "users", "user_id")):
        col = table.column(key)
        if col.null_count or len(pc.unique(col)) != len(col):
            raise ValueError(f"{name} table: {key} must be unique and non-null")
    for col in info.pii_fields.get("users", []):
        if col not in users.column_names:
            raise ValueError(f"pii field {col!r} is not a users column")
    if len(items) != info.n_items or len(users) != info.n_users:
        raise ValueError(
            f"info says {info.n_items} items / {info.n_users} users, tables have {len(items)} / {len(users)}"
        )
    for k, v in info.params.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"param {k!r} is not finite: {v}")
    _write_parquet_atomic(items, data_dir / ITEMS_FILE)
    _write_parquet_atomic(users, data_dir / USERS_FILE)
    text = json.dumps(info.to_json(), indent=2, sort_keys=True, default=_json_default) + "\n"
    _write_text_atomic(text, data_dir / INFO_FILE)


def ensure_new_data_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Create ``data_dir`` or accept an empty one; refuse one that already holds data.

    Generating or importing into a dir with events would append a second copy of the log.
    """
    data_dir = Path(data_dir)
    if data_dir.exists():
        if not data_dir.is_dir():
            raise ValueError(f"{data_dir} exists and is not a directory")
        taken = [n for n in (INFO_FILE, ITEMS_FILE, USERS_FILE, EVENTS_DIR) if (data_dir / n).exists()]
        if taken:
            raise ValueError(f"{data_dir} already holds a data dir ({', '.join(taken)}); choose a new or empty directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir
