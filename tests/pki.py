"""Certificates and tokens a test session makes for itself: a CA, the servers' certificate,
client certificates per identity (and broken ones), signing keys for end-user JWTs."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from shared.auth import certs
from shared.auth.policy import grants

TRUST_DOMAIN = "test.raven"
ISSUER = "https://issuer.test.raven"
AUDIENCE = "raven-training"


def sa(name: str, namespace: str = "tests") -> str:
    return certs.spiffe_id(TRUST_DOMAIN, namespace, name)


ADMIN = sa("admin")
PROXY = sa("envoy", "mesh")

# The session's policy: the default test client is `admin`; test_auth adds its own grants.
BASE_GRANTS: list[tuple[str, Sequence[str]]] = [(ADMIN, ["admin"])]


def _public_pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


class Pki:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca, self._ca_key = certs.new_ca("raven test CA")
        self.ca_pem = certs.cert_pem(self.ca)
        self.ca_file = directory / "ca.crt"
        certs.write_cert(self.ca_file, self.ca)
        server, server_key = certs.issue(
            self.ca,
            self._ca_key,
            uris=[sa("training-backbone", "raven")],
            dns_names=["localhost"],
            ip_addresses=["127.0.0.1"],
            server=True,
        )
        self.server_cert, self.server_key = directory / "server.crt", directory / "server.key"
        certs.write_cert(self.server_cert, server)
        certs.write_key(self.server_key, server_key)
        self.policy_file = directory / "policy.toml"
        self.write_policy(BASE_GRANTS)
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.jwt_key_files = [directory / "jwt-rsa.pem", directory / "jwt-ec.pem"]
        self.jwt_key_files[0].write_bytes(_public_pem(self.rsa_key))
        self.jwt_key_files[1].write_bytes(_public_pem(self.ec_key))
        self._clients: dict[tuple[str, ...], grpc.ChannelCredentials] = {}

    def write_policy(self, entries: Sequence[tuple[str, Sequence[str]]], extra: str = "") -> None:
        # Rename over the old file: readers see the old or the new policy, never half of one.
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(grants(entries) + extra)
        os.replace(tmp, self.policy_file)

    def credentials(
        self,
        *uris: str,
        expired: bool = False,
        other_ca: bool = False,
        client_cert: bool = True,
    ) -> grpc.ChannelCredentials:
        """Client credentials presenting a certificate with these URI SANs."""
        if not client_cert:
            return grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        ca, ca_key = certs.new_ca("another CA") if other_ca else (self.ca, self._ca_key)
        now = dt.datetime.now(dt.UTC)
        cert, key = certs.issue(
            ca,
            ca_key,
            uris=list(uris),
            not_before=now - dt.timedelta(days=2) if expired else None,
            not_after=now - dt.timedelta(days=1) if expired else None,
        )
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=certs.key_pem(key),
            certificate_chain=certs.cert_pem(cert),
        )

    def client_files(self, uri: str) -> tuple[Path, Path]:
        """A client certificate and key with this URI SAN, written to files (what a CLI
        user points RAVEN_TLS_CERT_FILE and RAVEN_TLS_KEY_FILE at)."""
        folder = self.directory / "clients" / uri.rsplit("/", 1)[-1]
        cert_file, key_file = folder / "client.crt", folder / "client.key"
        if not cert_file.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            cert, key = certs.issue(self.ca, self._ca_key, uris=[uri])
            certs.write_cert(cert_file, cert)
            certs.write_key(key_file, key)
        return cert_file, key_file

    def channel(self, port: int, *uris: str, **kwargs: Any) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", self.credentials(*uris, **kwargs))

    def token(
        self,
        subject: str = "alice",
        *,
        algorithm: str = "RS256",
        key: Any = None,
        audience: str = AUDIENCE,
        issuer: str = ISSUER,
        lifetime_s: float = 300,
        not_before_s: float = 0,
        **claims: Any,
    ) -> str:
        now = time.time()
        payload = {
            "sub": subject,
            "iss": issuer,
            "aud": audience,
            "iat": int(now),
            "nbf": int(now + not_before_s),
            "exp": int(now + lifetime_s),
            **claims,
        }
        if key is None:
            key = self.rsa_key if algorithm == "RS256" else self.ec_key
        return jwt.encode(payload, key, algorithm=algorithm)
