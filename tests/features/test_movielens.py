"""MovieLens 100K import: counts, exact timestamps, catalogue mapping, PII handling, errors.

The data is read from PARITY_MOVIELENS (default: ../shared/data/ml-100k beside the repo),
never copied into the repo. Without it these tests skip, unless PARITY_REQUIRE_MOVIELENS=1
(CI), where its absence is a failure.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from features.datasets import events_dir, load_info, read_items, read_users
from features.eventlog import EventLog
from features.events import EventType
from features.movielens import MovieLensFormatError, import_movielens

_DEFAULT = Path(__file__).resolve().parents[2].parent / "shared/data/ml-100k"


@pytest.fixture(scope="module")
def movielens_path() -> Path:
    path = Path(os.environ.get("PARITY_MOVIELENS") or _DEFAULT)
    if not (path / "u.data").is_file():
        msg = f"MovieLens 100K not found at {path}; set PARITY_MOVIELENS"
        if os.environ.get("PARITY_REQUIRE_MOVIELENS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def imported(movielens_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ml") / "data"
    import_movielens(movielens_path, out)
    return out


@pytest.mark.movielens
def test_counts_and_info(imported: Path) -> None:
    info = load_info(imported)
    assert info.kind == "movielens" and info.seed is None
    assert (info.n_events, info.n_users, info.n_items, info.n_topics) == (100_000, 943, 1682, 19)
    log = EventLog(events_dir(imported))
    assert log.count() == 100_000
    ev = log.read()
    assert len(ev) == 100_000
    assert info.start_ts == ev.ts.min() and info.end_ts == ev.ts.max() + 1
    assert np.all(ev.type == EventType.RATING)
    assert np.all(ev.creator_id == -1) and np.all(ev.session_id == -1)
    assert len(np.unique(ev.user_id)) == 943 and len(np.unique(ev.item_id)) == 1682
    assert len(np.unique(ev.event_id)) == 100_000


@pytest.mark.movielens
def test_events_match_u_data(imported: Path, movielens_path: Path) -> None:
    raw = np.loadtxt(movielens_path / "u.data", dtype=np.int64, delimiter="\t")
    ev = EventLog(events_dir(imported)).read()
    by_id = np.argsort(ev.event_id)  # event_id = line number
    assert np.array_equal(ev.event_id[by_id], np.arange(1, len(raw) + 1))
    assert np.array_equal(ev.user_id[by_id], raw[:, 0])
    assert np.array_equal(ev.item_id[by_id], raw[:, 1])
    assert np.array_equal(ev.value[by_id], raw[:, 2].astype(float))
    assert np.array_equal(ev.ts[by_id], raw[:, 3] * 1000)


@pytest.mark.movielens
def test_items(imported: Path) -> None:
    items = read_items(imported)
    assert items.num_rows == 1682
    rows = {r["item_id"]: r for r in items.to_pylist()}
    toy = rows[1]
    assert toy["title"] == "Toy Story (1995)"
    assert toy["genres"] == [3, 4, 5] and toy["topic"] == 3  # Animation, Children's, Comedy
    assert toy["publish_ts"] == 788_918_400_000  # 01-Jan-1995 00:00 UTC
    assert rows[267]["publish_ts"] == 0  # no release date
    assert rows[543]["title"].startswith("Misérables")  # Latin-1 decoded
    assert all(r["creator_id"] == -1 and r["duration_s"] == 0.0 and r["quality"] == 0.0 for r in rows.values())
    # event topics agree with the catalogue
    ev = EventLog(events_dir(imported)).read()
    topic_of = np.full(1683, -99)
    topic_of[items.column("item_id").to_numpy()] = items.column("topic").to_numpy()
    assert np.array_equal(ev.topic, topic_of[ev.item_id])


@pytest.mark.movielens
def test_users_and_pii(imported: Path) -> None:
    info = load_info(imported)
    assert info.pii_fields == {"users": ["zip_code"]}
    raw = json.loads((imported / "dataset.json").read_text())
    assert raw["pii_fields"] == {"users": ["zip_code"]}
    users = read_users(imported)
    assert "zip_code" not in users.column_names
    assert set(users.column_names) == {"user_id", "age", "gender", "occupation", "region"}
    assert users.num_rows == 943
    full = read_users(imported, include_pii=True)
    rows = {r["user_id"]: r for r in full.to_pylist()}
    assert rows[1] == dict(user_id=1, age=24, gender="M", occupation="technician", zip_code="85711", region=8)
    assert rows[74]["zip_code"] == "T8H1N" and rows[74]["region"] == -1  # non-numeric zip
    regions = full.column("region").to_numpy()
    assert regions.min() == -1 and regions.max() <= 9
    # no zip code leaks into dataset.json; the raw files are never copied into the data dir
    text = (imported / "dataset.json").read_text()
    assert not [z for z in {r["zip_code"] for r in rows.values()} if f'"{z}"' in text]
    assert not list(imported.rglob("u.*"))


def _tiny_ml(dst: Path) -> Path:
    """A made-up three-line MovieLens in the documented format (the real files stay put)."""
    dst.mkdir()
    flags = "|".join(["0"] * 19)
    (dst / "u.item").write_text(
        f"1|Café (1995)|01-Jan-1995||http://x|{'0|1|' + '|'.join(['0'] * 17)}\n2|unknown||||{flags}\n",
        encoding="latin-1",
    )
    (dst / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|K1A0B\n", encoding="latin-1")
    (dst / "u.data").write_text("1\t1\t5\t881250949\n2\t2\t3\t881250950\n2\t1\t1\t881250951\n")
    return dst


def test_tiny_import_without_movielens(tmp_path: Path) -> None:
    src = _tiny_ml(tmp_path / "ml")
    info = import_movielens(src, tmp_path / "out")
    assert (info.n_events, info.n_users, info.n_items) == (3, 2, 2)
    ev = EventLog(events_dir(tmp_path / "out")).read()
    assert ev.event_id.tolist() == [1, 2, 3] and ev.ts.tolist() == [881250949000, 881250950000, 881250951000]
    assert ev.topic.tolist() == [1, -1, 1] and ev.value.tolist() == [5.0, 3.0, 1.0]
    items = read_items(tmp_path / "out").to_pylist()
    assert items[0]["title"] == "Café (1995)" and items[1]["genres"] == [] and items[1]["publish_ts"] == 0
    users = read_users(tmp_path / "out", include_pii=True)
    assert users.column("region").to_pylist() == [8, -1]


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        import_movielens(tmp_path / "nowhere", tmp_path / "o1")
    src = _tiny_ml(tmp_path / "ml")
    user_text = (src / "u.user").read_text()
    (src / "u.user").unlink()
    with pytest.raises(FileNotFoundError, match="u.user"):
        import_movielens(src, tmp_path / "o2")
    (src / "u.user").write_text(user_text)
    good_data = (src / "u.data").read_text()
    (src / "u.data").write_text(good_data + "1\t2\tthree\t881250949\n")
    with pytest.raises(MovieLensFormatError, match=r"u\.data line 4"):
        import_movielens(src, tmp_path / "o3")
    assert not (tmp_path / "o3").exists()  # nothing written on a parse error
    (src / "u.data").write_text(good_data + "1\t9\t4\t881250949\n")
    with pytest.raises(ValueError, match="missing from u.item"):
        import_movielens(src, tmp_path / "o4")
    (src / "u.data").write_text(good_data)
    (src / "u.item").write_text("1|Toy Story|01-Jan-1995\n", encoding="latin-1")
    with pytest.raises(ValueError, match=r"u\.item line 1"):
        import_movielens(src, tmp_path / "o5")
    (src / "u.item").write_text(f"1|X|31-Foo-1995||u|{'|'.join(['0'] * 19)}\n", encoding="latin-1")
    with pytest.raises(ValueError, match="release date"):
        import_movielens(src, tmp_path / "o6")


@pytest.mark.movielens
def test_refuses_existing_data_dir(movielens_path: Path, imported: Path) -> None:
    with pytest.raises(ValueError, match="already holds a data dir"):
        import_movielens(movielens_path, imported)
