"""Bearer-token checks for the Admin service and for IngestEvents.

Every protected call must carry `authorization: Bearer <token>` matching the configured token
(compared in constant time); without one, or with a wrong one, UNAUTHENTICATED. With no token
configured the protected methods are disabled (every call refused), so a forgotten flag never
leaves release management, or everyone's features, open to any client that can reach the port.
"""
from __future__ import annotations

import hmac

from server.errors import ServingError

__all__ = ["Unauthenticated", "check_bearer"]


class Unauthenticated(ServingError):
    code = "UNAUTHENTICATED"


def check_bearer(metadata, token: str | None, *, what: str = "Admin",
                 disabled: str = "Admin is disabled on this server: start it with --admin-token (or PARITY_ADMIN_TOKEN)") -> None:
    """Raise Unauthenticated unless `metadata` carries `authorization: Bearer <token>`."""
    if not token:
        raise Unauthenticated(disabled)
    got = None
    for key, value in metadata or ():
        if key.lower() == "authorization":
            got = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            break
    if got is None:
        raise Unauthenticated(f"{what} needs metadata 'authorization: Bearer <token>'")
    scheme, _, presented = got.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise Unauthenticated("authorization must be 'Bearer <token>'")
    if not hmac.compare_digest(presented.strip().encode(), token.encode()):
        raise Unauthenticated(f"invalid token for {what}")
