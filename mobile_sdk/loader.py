"""A verified bundle ready to rank: the parts of a manifest this device uses, read through a
byte source that checks every size and sha256 (the cache on a cold start, downloads in a sync)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mobile_sdk.bundle import (Bin, FileRef, ItemTable, Lists, Manifest, UserFile, parse_bin, parse_items, parse_lists,
                               parse_user)
from mobile_sdk.errors import BundleError
from mobile_sdk.features import Column, plan_columns
from mobile_sdk.ranker import Ranker

# user_status values
USER_PRESENT = "present"
USER_NO_TOKEN = "no token"
USER_ABSENT = "absent"  # the bundle has no file for this token
USER_DELETED = "deleted"  # the token is in its bin's tombstones
USER_NOT_CACHED = "not cached"  # listed, but not downloaded yet (cold start with a new token)

Reader = Callable[[FileRef], bytes | None]  # verified bytes, None when absent


@dataclass(frozen=True)
class DeviceBundle:
    manifest: Manifest
    items: ItemTable
    lists: Lists
    ranker: Ranker
    plan: tuple[Column, ...]
    user: UserFile | None
    user_ref: FileRef | None
    user_status: str
    paths: frozenset[str]  # every cached blob this bundle uses

    @property
    def version(self) -> int:
        return self.manifest.version


def device_files(man: Manifest, token: str | None) -> list[FileRef]:
    """The files of `files` a device needs: the .ort model, items, and the bin of its own token."""
    paths = [man.model.ort, *man.chunks, man.stats, man.lists]
    bin_path = man.bin_for(token) if token else None
    if bin_path:
        paths.append(bin_path)
    return [man.ref(p) for p in paths]


def user_entry(man: Manifest, token: str | None, read: Reader) -> tuple[FileRef | None, str]:
    """The user file's ref (from the verified bin) and the user's status."""
    if not token:
        return None, USER_NO_TOKEN
    bin_path = man.bin_for(token)
    if bin_path is None:
        return None, USER_ABSENT
    data = read(man.ref(bin_path))
    if data is None:
        return None, USER_NOT_CACHED
    b: Bin = parse_bin(bin_path, data, token[: man.prefix_len])
    if token in b.tombstones:
        return None, USER_DELETED
    ref = b.users.get(token)
    return (ref, USER_PRESENT) if ref is not None else (None, USER_ABSENT)


def _need(read: Reader, ref: FileRef) -> bytes:
    data = read(ref)
    if data is None:
        raise BundleError(f"{ref.path} is missing")
    return data


def load(man: Manifest, token: str | None, read: Reader) -> DeviceBundle:
    model = man.model
    plan = plan_columns(model)
    ranker = Ranker(_need(read, man.ref(model.ort)), len(model.inputs))
    items = parse_items([(p, _need(read, man.ref(p))) for p in man.chunks], (man.stats, _need(read, man.ref(man.stats))),
                        model.dim, model.stat_columns, model.item_item)
    lists = parse_lists(man.lists, _need(read, man.ref(man.lists)))
    ref, status = user_entry(man, token, read)
    user = None
    if ref is not None:
        data = read(ref)
        if data is None:
            ref, status = None, USER_NOT_CACHED
        else:
            user = parse_user(ref.path, data, model.dim)
    paths = {r.path for r in device_files(man, token) if status != USER_NOT_CACHED or r.path != man.bin_for(token)}
    paths |= {ref.path} if ref is not None else set()
    return DeviceBundle(man, items, lists, ranker, plan, user, ref, status, frozenset(paths))
