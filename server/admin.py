"""The Admin service: release management and status, behind a bearer token.

Every call must carry `authorization: Bearer <token>` matching the configured token
(compared in constant time); without one, or with a wrong one, UNAUTHENTICATED. With no
token configured, Admin is disabled: every call is refused, so a forgotten flag never
leaves release management open.
"""
from __future__ import annotations

import hmac

import grpc

from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc
from server.errors import ServingError
from server.service import RecommenderService
from server.servicer import Handler

__all__ = ["AdminServicer", "check_bearer"]


class Unauthenticated(ServingError):
    code = "UNAUTHENTICATED"


def check_bearer(metadata, token: str | None) -> None:
    """Raise Unauthenticated unless `metadata` carries `authorization: Bearer <token>`."""
    if not token:
        raise Unauthenticated("Admin is disabled on this server: start it with --admin-token (or PARITY_ADMIN_TOKEN)")
    got = None
    for key, value in metadata or ():
        if key.lower() == "authorization":
            got = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            break
    if got is None:
        raise Unauthenticated("missing metadata 'authorization: Bearer <token>'")
    scheme, _, presented = got.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise Unauthenticated("authorization must be 'Bearer <token>'")
    if not hmac.compare_digest(presented.strip().encode(), token.encode()):
        raise Unauthenticated("invalid admin token")


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, service: RecommenderService, handler: Handler, token: str | None) -> None:
        self.service = service
        self.h = handler
        self._token = token

    async def LoadRelease(self, request: pb.LoadReleaseRequest, context: grpc.aio.ServicerContext) -> pb.LoadReleaseResponse:
        async def work(budget):
            check_bearer(context.invocation_metadata(), self._token)
            new, old, ms = await self.service.load_release(request.path)
            return pb.LoadReleaseResponse(release_id=new, previous_release_id=old, load_ms=ms)

        return await self.h.call("LoadRelease", context, work)

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        async def work(budget):
            check_bearer(context.invocation_metadata(), self._token)
            return pb.StatusResponse(**self.service.status())

        return await self.h.call("GetStatus", context, work)
