"""Transport security: gRPC mTLS credentials for servers and clients.

gRPC's TLS stack (BoringSSL) negotiates TLS 1.2 or 1.3 only: 1.2 is its default
minimum, and the admission (`shared.auth.authenticate`) refuses a connection reporting anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from shared.auth.tls import read_file, server_tls
from shared.settings import Settings


def server_credentials(settings: Settings, address: str) -> grpc.ServerCredentials | None:
    """mTLS credentials for a server at `address`; None for the development plaintext mode,
    which is refused unless `address` is loopback (`shared.auth.tls.server_tls`)."""
    tls = server_tls(settings, address)
    if tls is None:
        return None
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True
    )


@dataclass(frozen=True, slots=True)
class ClientTls:
    ca: bytes
    cert: bytes
    key: bytes
    # Host name to check in the server certificate when the address is not it.
    server_name: str = ""

    @classmethod
    def from_files(cls, *, ca: Path, cert: Path, key: Path, server_name: str = "") -> ClientTls:
        return cls(ca.read_bytes(), cert.read_bytes(), key.read_bytes(), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def client_tls(settings: Settings) -> ClientTls | None:
    """The client side of RAVEN_TLS_*: None in development plaintext mode."""
    if settings.insecure_dev:
        return None
    return ClientTls(
        ca=read_file(settings.tls_ca_file, "RAVEN_TLS_CA_FILE"),
        cert=read_file(settings.tls_cert_file, "RAVEN_TLS_CERT_FILE"),
        key=read_file(settings.tls_key_file, "RAVEN_TLS_KEY_FILE"),
        server_name=settings.tls_server_name,
    )


def channel(address: str, tls: ClientTls | None) -> grpc.Channel:
    """A blocking channel: mTLS with `tls`, plaintext (development mode) without."""
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.credentials(), options=tls.options())


def aio_channel(address: str, tls: ClientTls | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, tls.credentials(), options=tls.options())
