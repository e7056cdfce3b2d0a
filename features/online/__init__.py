"""Online store: opaque packed records under versioned keys, behind one interface.

Backends are chosen by a short name or URL through `open_store` (features.online.registry).
"""
from features.online.base import OnlineStore, RecordKey, StoreUnavailable
from features.online.registry import open_store

__all__ = ["OnlineStore", "RecordKey", "StoreUnavailable", "open_store"]
