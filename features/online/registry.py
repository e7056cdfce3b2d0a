"""Choose an online-store backend from a short spec string (config files, CLI flags, env).

Options are strict: a misspelt option (say `socket_timeout=` for `socket_timeout_s=`) is a
TypeError naming the key, because silently ignoring it would run production with defaults.
"""
from __future__ import annotations

from typing import Any

from features.online.base import OnlineStore

__all__ = ["open_store", "ALLOWED_SPECS"]

ALLOWED_SPECS = "'memory', 'redis://host:port/db', 'rediss://host:port/db' or 'redis+cluster://host:port' (also rediss+cluster://)"

# Options each backend accepts besides the spec and namespace.
_MEMORY_OPTIONS = frozenset({"clock"})
_REDIS_OPTIONS = frozenset({"socket_timeout_s", "client", "wait_replicas", "wait_timeout_ms"})


def _check_options(backend: str, options: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        accepted = ", ".join(sorted(allowed)) or "none"
        raise TypeError(f"unknown option {unknown[0]!r} for the {backend} online store (accepted: {accepted})")


def open_store(spec: str, namespace: str = "parity", **options: Any) -> OnlineStore:
    """Open the backend named by `spec`.

    - "memory" -> MemoryStore (options: clock)
    - "redis://...", "rediss://..." -> RedisStore on one server; "redis+cluster://host:port" or
      "rediss+cluster://..." -> RedisStore on a Redis Cluster seeded from that node
      (options: socket_timeout_s, client, wait_replicas and wait_timeout_ms for a cluster)
    """
    if not isinstance(spec, str):
        raise ValueError(f"online store spec must be a string: {ALLOWED_SPECS}; got {spec!r}")
    if spec == "memory":
        _check_options("memory", options, _MEMORY_OPTIONS)
        from features.online.memory import MemoryStore

        return MemoryStore(namespace, **options)
    if spec.startswith(("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")):
        _check_options("redis", options, _REDIS_OPTIONS)
        try:
            from features.online.redis_store import RedisStore
        except ModuleNotFoundError as exc:
            if exc.name == "redis" or (exc.name or "").startswith("redis."):
                raise ImportError(f"online store {spec.split('://')[0]}:// needs the redis package: pip install redis") from exc
            raise
        return RedisStore(url=spec, namespace=namespace, **options)
    shown = spec
    if "://" in spec:  # never echo credentials
        scheme, rest = spec.split("://", 1)
        shown = f"{scheme}://{rest.split('@')[-1]}"
    raise ValueError(f"unknown online store spec {shown!r}; allowed: {ALLOWED_SPECS}")
