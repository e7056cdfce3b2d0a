"""The SDK's errors: one base class, so an app can catch everything the SDK raises."""
from __future__ import annotations


class SDKError(Exception):
    """Base class of every error the SDK raises on purpose."""


class BundleError(SDKError):
    """A bundle (downloaded or cached) breaks BUNDLE_FORMAT.md: bad signature, wrong size or sha256, bad arrays."""


class SyncError(SDKError):
    """`Client.sync()` failed; nothing the current bundle uses was changed. `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoBundle(SDKError):
    """There is no verified bundle on this device (never synced, or the cache failed verification)."""
