"""Parity's device SDK: sync a signed bundle over HTTP, rank offline with a tiny ONNX ranker,
keep this session's events, and (hybrid mode) ask the server first within a deadline.

Ships alone (mobile_sdk/pyproject.toml): it imports numpy, onnxruntime, cryptography and the
standard library, nothing of Parity. The bundle contract is BUNDLE_FORMAT.md.
"""
from mobile_sdk.client import Client, Ranking
from mobile_sdk.errors import BundleError, NoBundle, SDKError, SyncError
from mobile_sdk.hybrid import GrpcTransport, ServerAnswer, TransportError
from mobile_sdk.session import Event
from mobile_sdk.sync import SyncResult

__all__ = ["BundleError", "Client", "Event", "GrpcTransport", "NoBundle", "Ranking", "SDKError", "ServerAnswer",
           "SyncError", "SyncResult", "TransportError"]
