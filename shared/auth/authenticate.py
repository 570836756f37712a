"""Who is calling: the workload's SPIFFE id and, optionally, the end user it acts for.

The workload identity comes from the client certificate the TLS handshake
verified against our CA (exactly one URI SAN, a valid SPIFFE id). Behind a
sidecar that terminates mTLS, the sidecar is the TLS peer and passes the
original client's certificate facts in `x-forwarded-client-cert`: that header
is believed only from a configured trusted proxy identity.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from cryptography import x509

from shared.auth import spiffe
from shared.auth.certs import uri_sans
from shared.auth.tokens import InvalidToken, TokenVerifier, UserClaims

if TYPE_CHECKING:
    import grpc

log = structlog.get_logger(__name__)

XFCC_HEADER = "x-forwarded-client-cert"
AUTHORIZATION = "authorization"
USER_PREFIX = "user:"
_TLS_VERSIONS = frozenset({b"TLSv1.2", b"TLSv1.3"})


class Unauthenticated(Exception):
    """Credentials missing or invalid. The message is for logs and audit, not the caller."""

    def __init__(self, reason: str, *, workload: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.workload = workload


@dataclass(frozen=True, slots=True)
class Principal:
    # SPIFFE id of the calling workload (the TLS peer, or the client a trusted proxy forwarded).
    workload: str
    user: UserClaims | None = None
    # The trusted proxy the workload identity came through, if any.
    proxy: str | None = None

    @property
    def on_behalf_of(self) -> str | None:
        return USER_PREFIX + self.user.subject if self.user else None

    @property
    def acting_as(self) -> str:
        """The identity recorded on what the call changes and owned by it: the user if any."""
        return self.on_behalf_of or self.workload


Metadata = Sequence[tuple[str, str | bytes]]


class Authenticator:
    def __init__(
        self,
        *,
        tls: bool,
        trusted_proxies: frozenset[str] = frozenset(),
        tokens: TokenVerifier | None = None,
        dev_identity: str = "",
    ) -> None:
        self._tls = tls
        self._trusted_proxies = trusted_proxies
        self._tokens = tokens
        self._dev_identity = dev_identity

    def authenticate(self, context: grpc.aio.ServicerContext, metadata: Metadata) -> Principal:
        peer = self._peer_identity(context) if self._tls else self._dev_identity
        workload, proxy = peer, None
        forwarded = _values(metadata, XFCC_HEADER)
        if forwarded:
            if self._tls and peer in self._trusted_proxies:
                workload, proxy = _forwarded_identity(forwarded, peer), peer
            else:
                # A client may not claim another identity by header: use its own.
                log.warning("x-forwarded-client-cert from an untrusted peer ignored", peer=peer)
        return Principal(workload=workload, user=self._user(metadata, workload), proxy=proxy)

    def _peer_identity(self, context: grpc.aio.ServicerContext) -> str:
        auth = context.auth_context()
        if auth.get("transport_security_type") != [b"ssl"]:
            raise Unauthenticated("not a TLS connection")
        if not _TLS_VERSIONS.intersection(auth.get("ssl_tls_version", [])):
            raise Unauthenticated("TLS older than 1.2")
        pems = auth.get("x509_pem_cert", [])
        if len(pems) != 1:
            raise Unauthenticated("no verified client certificate")
        return _certificate_identity(pems[0])

    def _user(self, metadata: Metadata, workload: str) -> UserClaims | None:
        headers = _values(metadata, AUTHORIZATION)
        if not headers:
            return None
        if len(headers) > 1:
            raise Unauthenticated("several authorization headers", workload=workload)
        scheme, _, token = headers[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization is not a bearer token", workload=workload)
        if self._tokens is None:
            # Ignoring it would grant the workload's permissions where the caller asked for
            # the (possibly narrower) user's: refuse instead.
            raise Unauthenticated("bearer token but no JWT issuer configured", workload=workload)
        try:
            return self._tokens.verify(token.strip())
        except InvalidToken as error:
            raise Unauthenticated(f"invalid bearer token: {error}", workload=workload) from error


@functools.lru_cache(maxsize=1024)
def _certificate_identity(pem: bytes) -> str:
    """The SPIFFE id of a verified certificate: its one URI SAN. Cached: peers reconnect
    with the same certificate, and parsing costs more than the rest of the check."""
    try:
        uris = uri_sans(x509.load_pem_x509_certificate(pem))
    except ValueError as error:
        raise Unauthenticated("unreadable client certificate") from error
    return _single_spiffe_id(uris)


def _single_spiffe_id(uris: Sequence[str]) -> str:
    if len(uris) != 1:
        raise Unauthenticated(f"certificate has {len(uris)} URI SANs, expected exactly one")
    try:
        return str(spiffe.parse(uris[0]))
    except spiffe.InvalidSpiffeId as error:
        raise Unauthenticated(f"URI SAN is not a SPIFFE id: {error}") from error


def _values(metadata: Metadata, key: str) -> list[str]:
    return [
        v.decode(errors="replace") if isinstance(v, bytes) else v for k, v in metadata if k == key
    ]


def _forwarded_identity(headers: list[str], proxy: str) -> str:
    """The client identity in an Envoy XFCC header: one element (one hop), one URI."""
    elements = [e for h in headers for e in parse_xfcc(h)]
    if len(elements) != 1:
        raise Unauthenticated(
            f"x-forwarded-client-cert has {len(elements)} elements, expected one", workload=proxy
        )
    uris = [v for k, v in elements[0] if k.lower() == "uri"]
    try:
        return _single_spiffe_id(uris)
    except Unauthenticated as error:
        raise Unauthenticated(f"forwarded {error.reason}", workload=proxy) from None


def parse_xfcc(header: str) -> list[list[tuple[str, str]]]:
    """Envoy's format: elements split by `,`, pairs by `;`, `key=value`, values optionally
    double-quoted (then `,;=` are literal and `\\"` is a quote)."""
    elements: list[list[tuple[str, str]]] = []
    pairs: list[tuple[str, str]] = []
    key, buf, in_value, quoted, i = "", [], False, False, 0
    while i < len(header):
        ch = header[i]
        if quoted:
            if ch == "\\" and i + 1 < len(header):
                buf.append(header[i + 1])
                i += 1
            elif ch == '"':
                quoted = False
            else:
                buf.append(ch)
        elif ch == '"' and in_value:
            quoted = True
        elif ch == "=" and not in_value:
            key, buf, in_value = "".join(buf).strip(), [], True
        elif ch in ";,":
            if in_value:
                pairs.append((key, "".join(buf).strip()))
            elif "".join(buf).strip():
                raise Unauthenticated("malformed x-forwarded-client-cert")
            key, buf, in_value = "", [], False
            if ch == ",":
                elements.append(pairs)
                pairs = []
        else:
            buf.append(ch)
        i += 1
    if quoted:
        raise Unauthenticated("malformed x-forwarded-client-cert")
    if in_value:
        pairs.append((key, "".join(buf).strip()))
    elif "".join(buf).strip():
        raise Unauthenticated("malformed x-forwarded-client-cert")
    elements.append(pairs)
    return [e for e in elements if e]
