"""What the server serves from: a release, the catalogue and the item table, swapped atomically.

A `Snapshot` is immutable. A request takes the current one once, at its start, and uses it
to the end, so a release swap or an item-table refresh never changes what a request in
flight sees: in-flight requests finish on the old release while new ones get the new one.
Swapping is one reference assignment on the event loop.

Loading a release is checked before anything serves from it: `load_release` verifies the
folder (manifest, files, hashes) and the skew guard refuses a release trained on feature-set
versions this server's feature definitions (and so its store keys) do not have.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from export.candidates import NewItems
from export.release import Release, ReleaseError, load_release
from export.runtime import RANKERS, ReleaseRuntime, ScorerFactory
from features.catalog import ItemCatalog
from features.definitions import FeatureSet
from server.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from server.items import ItemTable
from server.user_features import UserFeaturePlan

__all__ = ["Snapshot", "ServingState", "check_skew", "load_runtime", "build_snapshot", "register_ranker", "RANKER", "release_path_under", "release_ref"]

_MAX_PATH_CHARS = 1024

RANKER = "student_int8"  # the default ranker (ServerConfig.ranker)

# Rankers that are not ONNX files of the release: name -> factory(release) -> scorer. Empty in
# the product; bench/baseline_server.py registers the torch teacher here (torch stays out of server/).
_PLUGINS: dict[str, ScorerFactory] = {}


def register_ranker(name: str, factory: ScorerFactory) -> None:
    """Make `name` servable as ServerConfig.ranker: factory(release) returns the scorer."""
    if name in RANKERS:
        raise ValueError(f"{name!r} is a release ranker; choose another name")
    _PLUGINS[name] = factory


@dataclass(frozen=True)
class Snapshot:
    runtime: ReleaseRuntime
    items: ItemTable
    plan: UserFeaturePlan
    vocab_rows: np.ndarray  # catalogue row of each release item (-1: not in the catalogue)
    new: NewItems  # catalogue items the release has never seen, with their content-path embeddings
    catalog_stamp: tuple[int, int]
    loaded_at: float

    @property
    def release_id(self) -> str:
        return self.runtime.release_id

    @property
    def n_items(self) -> int:
        return int((self.vocab_rows >= 0).sum() + len(self.new.ids))

    @property
    def new_ids(self) -> np.ndarray:
        return self.new.ids


def check_skew(release: Release, sets: Mapping[str, FeatureSet]) -> None:
    """Refuse a release whose feature-set versions this server cannot read (the skew guard)."""
    wrong = []
    for name, version in sorted(release.feature_set_versions.items()):
        have = sets[name].version if name in sets else None
        if have != version:
            wrong.append(f"{name} {version} (server has {have or 'no such set'})")
    if wrong:
        raise FailedPrecondition(
            f"release {release.release_id} was trained on feature-set versions this server cannot serve: {', '.join(wrong)}; "
            "serve it with the feature definitions it was trained on, or retrain on the current ones")


def release_path_under(path: str, root: Path) -> Path:
    """The release folder a LoadRelease names: absolute, or relative to the releases root (a
    release id), and in either case inside the root once links and '..' are resolved."""
    if not isinstance(path, str) or not path.strip():
        raise InvalidArgument("path", "must name a release folder")
    if len(path) > _MAX_PATH_CHARS:
        raise InvalidArgument("path", f"is {len(path)} characters long; the limit is {_MAX_PATH_CHARS}")
    if "\x00" in path or not path.isprintable():
        raise InvalidArgument("path", "must be printable text without NUL bytes")
    base = Path(root).resolve()
    p = Path(path)
    target = (p if p.is_absolute() else base / p).resolve()
    if target != base and base not in target.parents:
        shown = path if len(path) <= 80 else path[:77] + "..."
        raise PermissionDenied(f"path: {shown!r} is outside the releases root {base}; LoadRelease only loads releases under it "
                               "(start the server with --releases-root to choose it)")
    return target


def release_ref(path: str, root: Path) -> str:
    """How the shared rollout state names a release LoadRelease loaded: its folder relative to
    the releases root (the release id in the usual layout), so every worker, whatever its
    working directory, resolves it to the same folder."""
    target = release_path_under(path, root)
    base = Path(root).resolve()
    return target.relative_to(base).as_posix() if target != base else str(target)


def load_runtime(path: str | Path, sets: Mapping[str, FeatureSet], *, ort_threads: int = 1, ranker: str = RANKER,
                 seen_cap: int | None = None) -> ReleaseRuntime:
    """Load, verify and skew-check a release. Raises InvalidArgument / FailedPrecondition with the reason."""
    if not str(path).strip():
        raise InvalidArgument("path", "must name a release folder")
    try:
        release = load_release(path)
    except ReleaseError as exc:
        raise FailedPrecondition(f"release refused: {exc}") from None
    check_skew(release, sets)
    if ranker not in RANKERS and ranker not in _PLUGINS:
        raise FailedPrecondition(f"ranker {ranker!r} is neither a release ranker {list(RANKERS)} nor a registered plugin {sorted(_PLUGINS)}")
    try:
        runtime = ReleaseRuntime.load(release, rankers=(ranker,), threads=ort_threads, plugins=_PLUGINS)
    except (ReleaseError, KeyError, ValueError, OSError, RuntimeError) as exc:
        # onnxruntime and ScaNN raise their own errors on broken model files
        raise FailedPrecondition(f"release {release.release_id} refused: its models do not load ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - any native loader failure means "not servable"
        raise FailedPrecondition(f"release {release.release_id} refused: its models do not load ({type(exc).__name__}: {exc})") from None
    needed = max(runtime.history_len, runtime.item_item.history_len if runtime.item_item is not None else 0)
    if seen_cap is not None and needed > seen_cap:
        # the seen record is the history the models read: a shorter one would feed them less than training did
        raise FailedPrecondition(f"release {release.release_id} reads each user's last {needed} engaged items, "
                                 f"but this server keeps {seen_cap} (seen_cap)")
    return runtime


def build_snapshot(runtime: ReleaseRuntime, items: ItemTable, sets: Mapping[str, FeatureSet], catalog_stamp: tuple[int, int],
                   *, prefetch_limit: int) -> Snapshot:
    """Everything derived from (release, catalogue): the key plan, vocabulary rows, new-item embeddings."""
    catalog: ItemCatalog = items.catalog
    if items.layout.feature_set.name != runtime.inputs.item_set or items.layout.feature_set.version != sets[runtime.inputs.item_set].version:
        raise FailedPrecondition(f"item table holds {items.layout.feature_set.name}, the release ranks with {runtime.inputs.item_set}")
    vocab_rows = catalog.index(runtime.vocab) if len(catalog) else np.full(len(runtime.vocab), -1, dtype=np.int64)
    plan = UserFeaturePlan(runtime.inputs, sets, catalog, prefetch_limit, items.modes)
    return Snapshot(runtime, items, plan, vocab_rows, NewItems.of(runtime, catalog), catalog_stamp, time.time())


class ServingState:
    """The snapshots being served: the primary, and a canary and a shadow during a rollout.
    Each is replaced whole, never mutated; a request takes its arm's snapshot once."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._arms: dict[str, Snapshot] = {"primary": snapshot}

    @property
    def current(self) -> Snapshot:
        return self._arms["primary"]

    def arm(self, name: str) -> Snapshot | None:
        return self._arms.get(name)

    def arms(self) -> dict[str, Snapshot]:
        return dict(self._arms)

    def swap(self, snapshot: Snapshot) -> Snapshot:
        """A new primary; returns the old one."""
        old = self._arms["primary"]
        self._arms = {**self._arms, "primary": snapshot}
        return old

    def set_arm(self, name: str, snapshot: Snapshot | None) -> None:
        if name == "primary":
            raise ValueError("the primary is replaced with swap()")
        arms = dict(self._arms)
        if snapshot is None:
            arms.pop(name, None)
        else:
            arms[name] = snapshot
        self._arms = arms

    def replace_all(self, primary_runtime, snapshots: dict[str, Snapshot]) -> bool:
        """Install rebuilt snapshots of the same releases (an item-table refresh), unless the
        primary's release changed meanwhile (False: a swap won the race)."""
        if self._arms["primary"].runtime is not primary_runtime:
            return False
        arms = dict(self._arms)
        for name, snap in snapshots.items():
            if name in arms and arms[name].runtime is snap.runtime:
                arms[name] = snap
        self._arms = arms
        return True
