"""How the Redis online store lays keys out and commits on a Redis Cluster.

A cluster runs a transaction (MULTI/EXEC, a Lua script, WATCH) only on keys of one hash slot.
Untagged keys spread one entity's records (its state, its served values beside it, its
markers) over unrelated slots, so a commit could only be a run of separate writes and a crash
between them counted events twice. Here every key carries a hash tag that puts what must
change together into one slot:

- a record `{ns}:{feature_set}:{version}:{entity_type}:{{entity_id}}`: every record of an
  entity id (all feature sets and versions, its state and its served values, its raw-event
  record) shares the slot of the tag `{entity_id}`; that set of keys is a *slot group*;
- a group marker `{ns}:__dedupe__:{{entity_id}}:{event_id}`: "this event is applied to this
  slot group", written in the same script as the group's records;
- metadata `{ns}:__meta__:{{ns:meta}}:{name}` and commit markers
  `{ns}:__dedupe__:{{ns:meta}}:{event_id}`: "the whole commit of this event is done", in one
  slot per namespace (the *meta group*). Entity ids cannot hold ':' (nor braces), so the tag
  `ns:meta` never equals an entity's.
Counters (`{ns}:__count__:{name}`) keep their untagged names: each is one key.

A commit is one Lua script per slot group (atomic there), sent per node on one connection (one
round trip for all nodes), the meta group last: records and their group markers land together, and the
commit marker -- what `seen()` reports -- only after every group is in. A crash between
groups leaves some groups applied with their markers and the rest untouched; a redelivered
event is then skipped exactly by the groups that hold its marker and applied by the others
(the ingestor asks per (event, key) pair: `Snapshot.seen_pairs`). A transaction checks, in
each group's script, that every key it read there is unchanged (SHA-1 of the value read, or
still absent) and writes only then; a group that finds a change makes the whole decision run
again on fresh values, with the groups already written visible through their markers.

Single-node Redis keeps the untagged layout byte for byte (features/online/redis_store.py);
this module is used only with a RedisCluster client.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from features.online.base import RecordKey, Write

__all__ = ["ClusterLayout", "GroupCommit", "CAS_SCRIPT", "READ_SCRIPT", "ABSENT", "digest"]

ABSENT = b"-"  # the expected digest of a key that was absent when read

# KEYS: the keys to check, then the keys to write. ARGV: the number of checks, one expected
# SHA-1 (or "-": absent) per check, then (value, px) per write (px "0": no expiry).
# Returns 1 after writing, 0 (nothing written) if a checked key changed.
CAS_SCRIPT = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local v = redis.call('GET', KEYS[i])
  local want = ARGV[i + 1]
  if v == false then
    if want ~= '-' then return 0 end
  elseif want == '-' or redis.sha1hex(v) ~= want then
    return 0
  end
end
local a = n + 2
for i = n + 1, #KEYS do
  if ARGV[a + 1] == '0' then
    redis.call('SET', KEYS[i], ARGV[a])
  else
    redis.call('SET', KEYS[i], ARGV[a], 'PX', ARGV[a + 1])
  end
  a = a + 2
end
return 1
"""


# Reads: GET of every key named in ARGV, in order (an absent key reads as nil). The keys go in
# ARGV, not KEYS: declared keys must share a slot, while a script flagged allow-cross-slot-keys
# (Redis >= 7) may read undeclared keys of any slot its node serves; the caller groups by node.
READ_SCRIPT = """#!lua flags=no-writes,allow-cross-slot-keys
local r = {}
for i = 1, #ARGV do
  r[i] = redis.call('GET', ARGV[i])
end
return r
"""


def digest(value: bytes | None) -> bytes:
    """What a group's script compares a key with: SHA-1 hex of the value read, or ABSENT."""
    return ABSENT if value is None else hashlib.sha1(value).hexdigest().encode()


class ClusterLayout:
    """The tagged key names of one namespace (see the module docstring)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.meta_tag = f"{namespace}:meta"

    def record(self, key: RecordKey) -> str:
        return f"{self.namespace}:{key.feature_set}:{key.version}:{key.entity_type}:{{{key.entity_id}}}"

    def group_prefix(self, feature_set: str, version: str, entity_type: str) -> str:
        """A KeyGroup's names are this plus "{id}" (get_groups builds them without RecordKeys)."""
        return f"{self.namespace}:{feature_set}:{version}:{entity_type}:"

    def group_marker(self, tag: str, event_id: int) -> str:
        return f"{self.namespace}:__dedupe__:{{{tag}}}:{event_id}"

    def commit_marker(self, event_id: int) -> str:
        return f"{self.namespace}:__dedupe__:{{{self.meta_tag}}}:{event_id}"

    def meta(self, name: str) -> str:
        return f"{self.namespace}:__meta__:{{{self.meta_tag}}}:{name}"

    @staticmethod
    def tag(key: RecordKey) -> str:
        """The slot group of a record: its entity id."""
        return key.entity_id

    @staticmethod
    def untag(entity: str) -> str | None:
        """The entity id of a scanned record key's last part, or None if it is not `{id}`."""
        if len(entity) < 3 or entity[0] != "{" or entity[-1] != "}":
            return None
        return entity[1:-1]


@dataclass
class GroupCommit:
    """One slot group's share of a commit: what its script checks, then what it writes."""

    check_keys: list[str] = field(default_factory=list)
    expected: list[bytes] = field(default_factory=list)
    write_keys: list[str] = field(default_factory=list)
    write_args: list[bytes | str | int] = field(default_factory=list)

    def check(self, name: str, value: bytes | None) -> None:
        self.check_keys.append(name)
        self.expected.append(digest(value))

    def write(self, name: str, value: bytes | str, px: int) -> None:
        self.write_keys.append(name)
        self.write_args += [value, px]

    def script_args(self) -> tuple[list[str], list]:
        return self.check_keys + self.write_keys, [len(self.check_keys), *self.expected, *self.write_args]


def split_commit(
    layout: ClusterLayout,
    writes: Sequence[Write],
    dedupe_ids: Sequence[int],
    dedupe_ttl_ms: int,
    meta: Mapping[str, str],
    marker_tags: Mapping[int, Sequence[str]],
) -> tuple[dict[str, GroupCommit], GroupCommit]:
    """A commit cut into slot groups: (entity groups by tag, the meta group).

    Each write goes to its entity's group; each dedupe id gets a group marker in every group
    `marker_tags` names for it (the groups its event touches) and a commit marker in the meta
    group, beside the metadata."""
    groups: dict[str, GroupCommit] = {}
    for w in writes:
        tag = layout.tag(w.key)
        g = groups.get(tag)
        if g is None:
            g = groups[tag] = GroupCommit()
        g.write(layout.record(w.key), w.value, w.ttl_ms)
    meta_group = GroupCommit()
    for event_id in dedupe_ids:
        for tag in marker_tags.get(event_id, ()):
            g = groups.get(tag)
            if g is None:
                g = groups[tag] = GroupCommit()
            g.write(layout.group_marker(tag, event_id), b"1", dedupe_ttl_ms)
        meta_group.write(layout.commit_marker(event_id), b"1", dedupe_ttl_ms)
    for name, value in meta.items():
        meta_group.write(layout.meta(name), value, 0)
    return groups, meta_group
