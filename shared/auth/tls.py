"""What a server's transport security is, from the settings: mTLS files, or the
development plaintext mode, which only a loopback address may use. No grpc here:
`shared.auth.transport` turns it into credentials."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import structlog

from shared.settings import Settings

log = structlog.get_logger(__name__)


class TransportConfigError(RuntimeError):
    pass


def read_file(path: Path | None, what: str) -> bytes:
    if path is None:
        raise TransportConfigError(
            f"{what} is not set: configure RAVEN_TLS_CERT_FILE, RAVEN_TLS_KEY_FILE and "
            "RAVEN_TLS_CA_FILE (`make certs` creates development ones), or set "
            "RAVEN_INSECURE_DEV=true for plaintext on a loopback address"
        )
    return path.expanduser().read_bytes()


@dataclass(frozen=True, slots=True)
class ServerTls:
    key: bytes
    cert: bytes
    ca: bytes


def server_tls(settings: Settings, address: str) -> ServerTls | None:
    """The key, certificate and CA a server at `address` serves mTLS with; None for the
    development plaintext mode, which is refused unless `address` is loopback."""
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
    return ServerTls(
        key=read_file(settings.tls_key_file, "RAVEN_TLS_KEY_FILE"),
        cert=read_file(settings.tls_cert_file, "RAVEN_TLS_CERT_FILE"),
        ca=read_file(settings.tls_ca_file, "RAVEN_TLS_CA_FILE"),
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
