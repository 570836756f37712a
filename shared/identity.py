"""Who is calling: the identity recorded on what a call changes, and the scope of what it sees.

The handler wrapper (shared/calls.py, with shared/auth/admission.py) admits every call before the
servicer runs and publishes the caller for the call's task; these functions
read it, so servicers stay free of transport details.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import grpc

from shared.auth.admission import current_access
from shared.errors import NotFound
from shared.names import TRAINED_MODELS, TRAINING_RUNS

ANONYMOUS = "anonymous"


def caller_identity(context: grpc.aio.ServicerContext) -> str:
    """The admitted caller: the end user (`user:<sub>`) a call acts for, else the workload's
    SPIFFE id. "anonymous" only where no interceptor ran (never on a served RPC)."""
    access = current_access()
    return access.principal.acting_as if access else ANONYMOUS


def owner_scope(context: grpc.aio.ServicerContext, collection: str = TRAINING_RUNS) -> str | None:
    """The identity whose resources of `collection` alone the caller may see or name (it
    holds only `<read>.own` for them); None when it is not limited."""
    access = current_access()
    if access is None:
        return None
    return access.scopes.get(collection) or (access.owner if collection == TRAINING_RUNS else None)


_NOUNS = {TRAINING_RUNS: "training run", TRAINED_MODELS: "trained model"}


def missing(collection: str, resource_id: uuid.UUID | str) -> NotFound:
    """The answer for a resource that does not exist, and for one the caller may not see."""
    return NotFound(f"{_NOUNS[collection]} {resource_id} does not exist")


def visible(owner: str | None, creator: str | None) -> bool:
    """The ownership rule: a caller limited to `owner` sees what `owner` created only."""
    return owner is None or creator == owner


async def require_visible(
    context: grpc.aio.ServicerContext,
    collection: str,
    resource_id: uuid.UUID,
    creator_of: Callable[[uuid.UUID], Awaitable[str | None]],
) -> None:
    """NOT_FOUND, worded as for a missing resource, when the caller may name only its own
    resources of `collection` and this one (if it exists at all) is another's. Every RPC
    that names an existing resource calls it before acting; an unlimited caller costs no
    query."""
    owner = owner_scope(context, collection)
    if owner is None:
        return
    if not visible(owner, await creator_of(resource_id)):
        raise missing(collection, resource_id)
