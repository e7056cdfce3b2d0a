"""The Admin service: release management and status, behind a bearer token (server/auth.py).

LoadRelease only loads folders under the configured releases root (`--releases-root`, by
default the folder holding the release served at start-up): a token leak must not turn into
"load any directory on this machine". Admin calls have their own admission lane and no
deadline cap (a release load takes seconds).
"""
from __future__ import annotations

import grpc

from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc
from server.auth import check_bearer
from server.service import RecommenderService
from server.servicer import Handler, _check_parsed
from server.errors import InvalidArgument
from server.rollout import RolloutSpec
from server.validation import parse_id

__all__ = ["AdminServicer"]


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, service: RecommenderService, handler: Handler, token: str | None) -> None:
        self.service = service
        self.h = handler
        self._token = token

    async def LoadRelease(self, request: pb.LoadReleaseRequest, context: grpc.aio.ServicerContext) -> pb.LoadReleaseResponse:
        async def work(budget):
            _check_parsed(request)
            new, old, ms = await self.service.load_release(request.path)
            return pb.LoadReleaseResponse(release_id=new, previous_release_id=old, load_ms=ms)

        return await self.h.call("LoadRelease", context, work, lane="admin", capped=False, guard=lambda: self._auth(context))

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        async def work(budget):
            _check_parsed(request)
            st = self.service.status()
            st["feature_sets"] = {k: pb.FeatureSetServing(**v) for k, v in st["feature_sets"].items()}
            return pb.StatusResponse(**st)

        return await self.h.call("GetStatus", context, work, lane="admin", capped=False, guard=lambda: self._auth(context))

    async def DeleteUser(self, request: pb.DeleteUserRequest, context: grpc.aio.ServicerContext) -> pb.DeleteUserResponse:
        async def work(budget):
            _check_parsed(request)
            uid = parse_id("user_id", request.user_id, max_chars=self.service.cfg.max_id_chars)
            rep = await self.service.delete_user(uid, request.reason, actor="admin")
            return pb.DeleteUserResponse(online_keys_deleted=rep.online_keys_deleted + rep.seen_records_deleted + rep.counters_deleted,
                                         cache_entries_dropped=rep.cache_entries_dropped,
                                         served_log_rows_removed=rep.served_log_rows_removed + rep.feedback_rows_removed, audit_id=rep.audit_id)

        return await self.h.call("DeleteUser", context, work, lane="admin", capped=False, guard=lambda: self._auth(context))

    async def SetRollout(self, request: pb.SetRolloutRequest, context: grpc.aio.ServicerContext) -> pb.RolloutStatus:
        async def work(budget):
            _check_parsed(request)
            which = request.WhichOneof("action")
            if which == "spec":
                out = await self.service.set_rollout(RolloutSpec.from_message(request.spec))
            elif which == "promote" and request.promote:
                out = await self.service.set_rollout(promote=True)
            elif which == "abort" and request.abort:
                out = await self.service.set_rollout(abort=True)
            else:
                raise InvalidArgument("action", "set one of spec, promote=true or abort=true")
            return _status(out)

        return await self.h.call("SetRollout", context, work, lane="admin", capped=False, guard=lambda: self._auth(context))

    async def GetRollout(self, request: pb.GetRolloutRequest, context: grpc.aio.ServicerContext) -> pb.RolloutStatus:
        async def work(budget):
            _check_parsed(request)
            return _status(self.service.rollout_status())

        return await self.h.call("GetRollout", context, work, lane="admin", capped=False, guard=lambda: self._auth(context))

    def _auth(self, context: grpc.aio.ServicerContext) -> None:
        check_bearer(context.invocation_metadata(), self._token)


def _status(d: dict) -> pb.RolloutStatus:
    d = dict(d)
    arms = [pb.ArmStats(**a) for a in d.pop("arms", [])]
    shadow = {k: float(v) for k, v in d.pop("shadow", {}).items()}
    return pb.RolloutStatus(**d, arms=arms, shadow=shadow)
