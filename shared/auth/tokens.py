"""End-user bearer tokens: JWTs signed by a configured issuer, verified with its public keys.

Only RS256 and ES256 are accepted, and each key only with its own algorithm:
an RSA key never verifies an ES256 token, no key verifies `none` or an HMAC
token (the classic confusion of using a public key as an HMAC secret cannot
happen because no symmetric algorithm is ever allowed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

_REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]


class InvalidToken(Exception):
    """Why a token was refused; logged and audited, never sent to the caller."""


@dataclass(frozen=True, slots=True)
class UserClaims:
    subject: str
    claims: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class _Key:
    algorithm: str
    key: Any


class TokenVerifier:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        public_keys: Sequence[bytes],
        leeway_s: float = 30.0,
    ) -> None:
        if not issuer or not audience:
            raise ValueError("a JWT issuer and audience are required with JWT public keys")
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_s
        self._keys = [_key(pem) for pem in public_keys]

    @classmethod
    def from_files(
        cls, *, issuer: str, audience: str, key_files: Sequence[Path], leeway_s: float
    ) -> TokenVerifier:
        return cls(
            issuer=issuer,
            audience=audience,
            public_keys=[p.read_bytes() for p in key_files],
            leeway_s=leeway_s,
        )

    def verify(self, token: str) -> UserClaims:
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.InvalidTokenError as error:
            raise InvalidToken(f"malformed token: {error}") from error
        candidates = [k for k in self._keys if k.algorithm == algorithm]
        if not candidates:
            raise InvalidToken(f"algorithm {algorithm!r} not accepted")
        last: Exception | None = None
        for candidate in candidates:
            try:
                claims = jwt.decode(
                    token,
                    candidate.key,
                    algorithms=[candidate.algorithm],
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway,
                    options={"require": _REQUIRED_CLAIMS, "verify_nbf": True},
                )
            except jwt.InvalidSignatureError as error:
                last = error
                continue  # Maybe the next key (rotation) signed it.
            except jwt.InvalidTokenError as error:
                raise InvalidToken(str(error)) from error
            subject = claims.get("sub")
            if not isinstance(subject, str) or not subject:
                raise InvalidToken("no subject")
            return UserClaims(subject=subject, claims=claims)
        raise InvalidToken(f"bad signature: {last}")


def _key(pem: bytes) -> _Key:
    key = load_pem_public_key(pem)
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError("RSA keys shorter than 2048 bits are refused")
        return _Key("RS256", key)
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return _Key("ES256", key)
    raise ValueError("JWT public keys must be RSA (RS256) or EC P-256 (ES256)")
