"""Authentication and authorization of every call, before the servicer runs.

`Admission` is what the one handler wrapper (`shared.calls`) asks: it runs in
the call's own task, with the servicer context, so it can read the verified
peer certificate, refuse the call, and publish the caller through a context
variable that `shared.identity` reads. The wrapper maps the handler's errors to
a status inside `audited`, so the audit records the final status.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import structlog
from google.protobuf.message import Message

from shared.auth.audit import UNAUTHENTICATED_IDENTITY, AuditLog, Entry, expect_change
from shared.auth.authenticate import Authenticator, Principal, Unauthenticated
from shared.auth.permissions import READ_RULES, RULES, Level, Permission, Rule, level
from shared.auth.policy import Policy, PolicyStore
from shared.auth.tokens import TokenVerifier
from shared.settings import Settings

log = structlog.get_logger(__name__)

# Constant texts: a refused caller learns nothing about what exists or what is missing.
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED: "authentication required",
    grpc.StatusCode.PERMISSION_DENIED: "permission denied",
}


@dataclass(frozen=True, slots=True)
class Access:
    principal: Principal
    # Set when the caller may only touch what this identity created (a `.own` permission).
    owner: str | None = None
    # By collection ("trainingRuns", "trainedModels"): the identity whose resources alone
    # the caller may name, because it may read only its own (READ_RULES).
    scopes: Mapping[str, str] = dataclasses.field(default_factory=dict)


_access: ContextVar[Access | None] = ContextVar("raven_access", default=None)


def current_access() -> Access | None:
    """The admitted caller of the call running in this task; None outside a guarded call."""
    return _access.get()


class Admission:
    """Admits or refuses each call (but health and reflection: `OPEN_SERVICES`); audits changes."""

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        policies: PolicyStore,
        audit: AuditLog | None,
        rules: Mapping[str, Rule] = RULES,
    ) -> None:
        self._authenticator = authenticator
        self._policies = policies
        self._audit = audit
        self._rules = rules
        # Audit writes of cancelled calls finish in the background; keep them referenced.
        self._pending: set[asyncio.Task[None]] = set()

    async def admit(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        metadata: tuple[Any, ...],
        request: Message | None,
    ) -> Access:
        """The caller and its scope, published to this call's task (`current_access`); or
        the call aborted with UNAUTHENTICATED or PERMISSION_DENIED."""
        try:
            principal = self._authenticator.authenticate(context, metadata)
        except Unauthenticated as error:
            await self._refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                Entry(
                    identity=error.workload or UNAUTHENTICATED_IDENTITY,
                    rpc=method,
                    resource=resource_of(request),
                    outcome=grpc.StatusCode.UNAUTHENTICATED.name,
                    detail=error.reason,
                    peer=context.peer(),
                ),
            )
        rule = self._rules.get(method)
        policy = self._policies.current()
        workload = level(policy.for_workload(principal.workload), rule) if rule else None
        user = (
            level(policy.for_claims(principal.user.claims), rule)
            if rule and principal.user
            else Level.ALL
        )
        if rule is None or workload is None or user is None:
            if rule is None:
                log.error("RPC has no permission rule; denied", rpc=method)
                detail = "RPC has no permission rule"
            else:
                who = "workload" if workload is None else "user"
                detail = f"{who} lacks {rule.permission}"
            await self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                _entry(principal, method, request, "PERMISSION_DENIED", context, detail=detail),
            )
        owner = principal.acting_as if Level.OWN in (workload, user) else None
        scopes = {}
        for collection, read in READ_RULES.items():
            reads = (
                level(policy.for_workload(principal.workload), read),
                level(policy.for_claims(principal.user.claims), read) if principal.user else None,
            )
            if Level.OWN in reads:
                scopes[collection] = principal.acting_as
        access = Access(principal, owner, scopes)
        # Each call runs in its own task (and context copy): no reset needed, no leak to others.
        _access.set(access)
        return access

    async def _refuse(
        self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, entry: Entry
    ) -> NoReturn:
        log.warning("call refused", rpc=entry.rpc, identity=entry.identity, reason=entry.detail)
        if self._audit is not None:
            await self._audit.record(entry)
        await context.abort(code, _REFUSALS[code])
        raise AssertionError("abort returned")  # pragma: no cover

    async def audited(
        self,
        method: str,
        access: Access,
        context: grpc.aio.ServicerContext,
        request: Message | None,
        run: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Runs the handler; records the outcome of a state-changing call: with the
        change, by the unit of work that commits it, or here when none committed."""
        rule = self._rules.get(method)
        if self._audit is None or rule is None or not rule.mutates:
            return await run()
        change = expect_change(_entry(access.principal, method, request, "OK", context))
        response = None
        try:
            response = await run()
            outcome = grpc.StatusCode.OK.name
            return response
        except asyncio.CancelledError:
            outcome = grpc.StatusCode.CANCELLED.name
            if not change.close():
                entry = _entry(access.principal, method, request, outcome, context)
                task = asyncio.create_task(self._audit.record(entry))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
            raise
        except BaseException:
            code = context.code()
            outcome = code.name if isinstance(code, grpc.StatusCode) else "INTERNAL"
            raise
        finally:
            if outcome != grpc.StatusCode.CANCELLED.name and not change.close():
                await self._audit.record(
                    _entry(access.principal, method, request, outcome, context, response)
                )


def _entry(
    principal: Principal,
    method: str,
    request: Message | None,
    outcome: str,
    context: grpc.aio.ServicerContext,
    response: Any = None,
    *,
    detail: str = "",
) -> Entry:
    return Entry(
        identity=principal.workload,
        on_behalf_of=principal.on_behalf_of or "",
        proxy=principal.proxy or "",
        rpc=method,
        resource=resource_of(response) or resource_of(request),
        outcome=outcome,
        detail=detail,
        peer=context.peer(),
    )


def resource_of(message: Any) -> str:
    """The resource name a request or response carries: its `name`, or the `name` of a
    top-level message field (`UpdateTrainingRunRequest.training_run.name`)."""
    if not isinstance(message, Message):
        return ""
    fields = message.DESCRIPTOR.fields_by_name
    if "name" in fields and isinstance(message.name, str) and message.name:  # type: ignore[attr-defined]
        return str(message.name)  # type: ignore[attr-defined]
    for field in message.DESCRIPTOR.fields:
        if field.message_type is None or "name" not in field.message_type.fields_by_name:
            continue
        try:
            present = message.HasField(field.name)
        except ValueError:  # Repeated and map fields have no presence.
            continue
        if present:
            name = getattr(getattr(message, field.name), "name", "")
            if isinstance(name, str) and name:
                return name
    return ""


def build_admission(settings: Settings, audit: AuditLog | None) -> Admission:
    """The admission of a service process from its settings; `audit` None: no audit."""
    tokens = (
        TokenVerifier.from_files(
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            key_files=settings.jwt_public_key_files,
            leeway_s=settings.jwt_leeway_s,
        )
        if settings.jwt_public_key_files
        else None
    )
    fallback = None
    if settings.auth_policy_file is None:
        if settings.insecure_dev:
            # Development plaintext: the one local identity may do everything.
            fallback = Policy(exact={settings.dev_identity: frozenset({Permission.ADMIN.value})})
        else:
            log.warning("no RAVEN_AUTH_POLICY_FILE: every RPC but health and reflection is denied")
    return Admission(
        authenticator=Authenticator(
            tls=not settings.insecure_dev,
            trusted_proxies=frozenset(settings.trusted_proxies),
            tokens=tokens,
            dev_identity=settings.dev_identity,
        ),
        policies=PolicyStore(
            settings.auth_policy_file,
            check_interval_s=settings.auth_policy_check_interval_s,
            fallback=fallback,
        ),
        audit=audit,
    )
