"""Who is calling: the identity recorded on what a call changes, and the scope of what it sees.

The auth interceptor (shared/auth/interceptor.py) admits every call before the
servicer runs and publishes the caller for the call's task; these functions
read it, so servicers stay free of transport details.
"""

from __future__ import annotations

import grpc

from shared.auth.interceptor import current_access

ANONYMOUS = "anonymous"


def caller_identity(context: grpc.aio.ServicerContext) -> str:
    """The admitted caller: the end user (`user:<sub>`) a call acts for, else the workload's
    SPIFFE id. "anonymous" only where no interceptor ran (never on a served RPC)."""
    access = current_access()
    return access.principal.acting_as if access else ANONYMOUS


def owner_scope(context: grpc.aio.ServicerContext) -> str | None:
    """The identity a caller holding only a `.own` permission is limited to; None when the
    caller may see everything the RPC serves."""
    access = current_access()
    return access.owner if access else None
