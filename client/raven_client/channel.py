"""Channels to the services: mutual TLS with a client certificate, or plaintext for a
development stack that runs without TLS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# The services accept messages up to 16 MiB. Reconnect quickly after an outage, so that
# a retried call finds the service as soon as it is back.
_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass(frozen=True, slots=True)
class Tls:
    """Files of mutual TLS: the CA that signed the servers' certificates, and this client's
    certificate and key (its SPIFFE id decides what it may do). `server_name` overrides
    the name checked against the server's certificate (e.g. "localhost" when dialling
    an IP address the certificate does not list)."""

    ca: Path | str
    cert: Path | str | None = None
    key: Path | str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both cert and key, or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca).read_bytes(),
            private_key=Path(self.key).read_bytes() if self.key is not None else None,
            certificate_chain=Path(self.cert).read_bytes() if self.cert is not None else None,
        )


def open_channel(address: str, tls: Tls | None, interceptors: Sequence[Any] = ()) -> grpc.Channel:
    """A channel to `address` ("host:port"): TLS when `tls` is given, else plaintext;
    `interceptors` (grpc.*ClientInterceptor: tracing, metrics, ...) see every call."""
    if tls is None:
        channel = grpc.insecure_channel(address, options=_OPTIONS)
    else:
        options = list(_OPTIONS)
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        channel = grpc.secure_channel(address, tls.credentials(), options=options)
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel
