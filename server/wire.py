"""Registering servicers with deserializers that never raise.

grpc's generated `add_*Servicer_to_server` parses request bytes with `Message.FromString`
before any handler runs; garbage bytes then surface as UNKNOWN with a DecodeError class name.
Here the same handlers are built from the service descriptor, but a request that does not
parse arrives at the handler as a `BadBytes` value, which the handler refuses with
INVALID_ARGUMENT (and an ingest stream counts as one invalid event).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

__all__ = ["BadBytes", "add_servicer"]


@dataclass(frozen=True)
class BadBytes:
    """A request message that could not be parsed."""

    message_type: str
    size: int
    error: str

    def describe(self) -> str:
        return f"request bytes ({self.size}) are not a valid {self.message_type}: {self.error[:80]}"


def _safe(cls) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.full_name

    def parse(raw: bytes):
        try:
            return cls.FromString(raw)
        except (DecodeError, ValueError, RuntimeError) as exc:  # upb raises DecodeError; be lenient about the class
            return BadBytes(name, len(raw), str(exc) or type(exc).__name__)

    return parse


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(server: grpc.aio.Server, pb_module: ModuleType, service: str, servicer: object) -> None:
    """Like the generated add_<service>Servicer_to_server, with non-raising deserializers."""
    desc = pb_module.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for m in desc.methods:
        req = getattr(pb_module, m.input_type.name)
        resp = getattr(pb_module, m.output_type.name)
        factory = _FACTORIES[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = factory(getattr(servicer, m.name), request_deserializer=_safe(req), response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))
    server.add_registered_method_handlers(desc.full_name, handlers)
