"""Transport security: mTLS credentials for servers and clients, and the plaintext guard.

gRPC's TLS stack (BoringSSL) negotiates TLS 1.2 or 1.3 only: 1.2 is its default
minimum, and the interceptor refuses a connection reporting anything else.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from shared.settings import Settings

log = structlog.get_logger(__name__)


class TransportConfigError(RuntimeError):
    pass


def _read(path: Path | None, what: str) -> bytes:
    if path is None:
        raise TransportConfigError(
            f"{what} is not set: configure RAVEN_TLS_CERT_FILE, RAVEN_TLS_KEY_FILE and "
            "RAVEN_TLS_CA_FILE (`make certs` creates development ones), or set "
            "RAVEN_INSECURE_DEV=true for plaintext on a loopback address"
        )
    return path.expanduser().read_bytes()


def server_credentials(settings: Settings, address: str) -> grpc.ServerCredentials | None:
    """mTLS credentials for a server at `address`; None for the development plaintext mode,
    which is refused unless `address` is loopback."""
    if settings.insecure_dev:
        if not is_loopback(address):
            raise TransportConfigError(
                f"RAVEN_INSECURE_DEV allows plaintext on loopback only, not on {address}"
            )
        log.warning(
            "INSECURE: plaintext gRPC without client authentication (RAVEN_INSECURE_DEV); "
            "every caller is the development identity",
            address=address,
            identity=settings.dev_identity,
        )
        return None
    return grpc.ssl_server_credentials(
        [
            (
                _read(settings.tls_key_file, "RAVEN_TLS_KEY_FILE"),
                _read(settings.tls_cert_file, "RAVEN_TLS_CERT_FILE"),
            )
        ],
        root_certificates=_read(settings.tls_ca_file, "RAVEN_TLS_CA_FILE"),
        require_client_auth=True,
    )


def is_loopback(address: str) -> bool:
    """`127.0.0.1:50051`, `[::1]:0`, `localhost:8080`: True. Wildcards and others: False."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        ca=_read(settings.tls_ca_file, "RAVEN_TLS_CA_FILE"),
        cert=_read(settings.tls_cert_file, "RAVEN_TLS_CERT_FILE"),
        key=_read(settings.tls_key_file, "RAVEN_TLS_KEY_FILE"),
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
