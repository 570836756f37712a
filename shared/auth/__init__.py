"""Service identity and authorization: mTLS transport, caller identity (SPIFFE ids,
trusted-proxy forwarding, end-user JWTs), the permission table, the policy file, audit.

`build_admission` is what a composition root calls; servicers only use
`shared.identity`.
"""

from __future__ import annotations

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.auth.audit import AuditLog
from shared.auth.authenticate import Authenticator
from shared.auth.admission import Access, Admission, current_access
from shared.auth.permissions import Permission
from shared.auth.policy import Policy, PolicyStore
from shared.auth.tokens import TokenVerifier
from shared.messaging import Subjects
from shared.settings import Settings

__all__ = ["Access", "Admission", "Permission", "build_admission", "current_access"]

log = structlog.get_logger(__name__)


def build_admission(settings: Settings, audit: AuditLog | None) -> Admission:
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


def audit_log(sessions: async_sessionmaker[AsyncSession], subjects: Subjects) -> AuditLog:
    return AuditLog(sessions, subjects)
