"""Parity's device SDK: sync a signed bundle over HTTP, rank offline with a tiny ONNX ranker,
keep this session's events, and (hybrid mode) ask the server first within a deadline.

Ships alone (mobile_sdk/pyproject.toml): it imports numpy, onnxruntime, cryptography and the
standard library, nothing of Parity. The bundle contract is BUNDLE_FORMAT.md.

    client = Client("https://cdn.example/bundle", cache_dir, "signing.pub", user_token)
    client.sync()                      # SyncError on any failure; the last good bundle stays
    client.record({"ts": now_ms, "item_id": 42, "type": 1, "value": 12.0})
    ranking = client.rank(user_id, context={"now_ms": now_ms}, k=10)   # offline; NoBundle if never synced
    ranking.source                     # "user", "popular" or "request"

Hybrid: `Client(..., transport=GrpcTransport("host:port"))`, then `client.recommend(user_id,
deadline_s=0.040)` answers from the server, or from the device (`ranking.fallback_reason`).
One Client per cache directory: two clients must not sync into the same one at once.
"""
from mobile_sdk.client import Client, Ranking
from mobile_sdk.errors import BundleError, NoBundle, SDKError, SyncError
from mobile_sdk.hybrid import GrpcTransport, ServerAnswer, TransportError
from mobile_sdk.session import Event
from mobile_sdk.sync import SyncResult

__all__ = ["BundleError", "Client", "Event", "GrpcTransport", "NoBundle", "Ranking", "SDKError", "ServerAnswer",
           "SyncError", "SyncResult", "TransportError"]
