"""Resolving a data dir given on the command line and the feature sets that go with it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from features.datasets import EVENTS_DIR, INFO_FILE, DatasetInfo, load_info
from features.definitions import FeatureSet
from features.eventlog import EventLog
from features.offline import OfflineStore
from features.repo import feature_sets

__all__ = ["Workspace", "open_workspace", "existing_data_dir"]


@dataclass(frozen=True)
class Workspace:
    data_dir: Path
    info: DatasetInfo
    log: EventLog
    sets: tuple[FeatureSet, ...]

    @property
    def offline(self) -> OfflineStore:
        return OfflineStore(self.data_dir / "offline")

    def feature_set(self, name: str) -> FeatureSet:
        for fs in self.sets:
            if fs.name == name:
                return fs
        raise ValueError(f"unknown feature set {name!r}; this data dir has: {', '.join(fs.name for fs in self.sets)}")


def existing_data_dir(path: str | Path) -> Path | None:
    """The data dir named by ``path`` (itself or the parent of its events/ folder), or None if
    it is not one: where a command's outputs go, checked only once the input exists."""
    p = Path(path)
    if (p / INFO_FILE).exists():
        return p
    if p.name == EVENTS_DIR and (p.parent / INFO_FILE).exists():
        return p.parent
    return None


def open_workspace(path: str | Path) -> Workspace:
    """Accepts the data dir (holding dataset.json and events/) or its events/ folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--events {p}: no such directory")
    data_dir = existing_data_dir(p)
    if data_dir is None:
        raise FileNotFoundError(f"--events {p}: not a Parity data dir (no {INFO_FILE}); make one with `parity data simulate` or `parity data import-movielens`")
    info = load_info(data_dir)
    return Workspace(data_dir, info, EventLog(data_dir / EVENTS_DIR), feature_sets(info.kind, info.n_topics))
