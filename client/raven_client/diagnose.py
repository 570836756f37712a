"""Why a channel to a service fails, in one line: gRPC reports a refused TLS handshake
and an address where nothing listens alike (UNAVAILABLE), so this probes the server
itself, with the standard library's `socket` and `ssl` and the channel's own files.

    status = raven_client.diagnose("127.0.0.1:50051", tls)  # None: the handshake succeeds
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from raven_client.channel import Tls

__all__ = ["Diagnosis", "Problem", "diagnose", "probe"]

# The client's half of an HTTP/2 connection preface: a server that accepted the client
# certificate answers it with its SETTINGS; one that refused it sends a TLS alert instead.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class Problem(StrEnum):
    CLIENT_FILES = "client_files"
    NOTHING_LISTENING = "nothing_listening"
    UNREACHABLE = "unreachable"
    SERVER_UNKNOWN_CA = "server_unknown_ca"
    SERVER_NAME_MISMATCH = "server_name_mismatch"
    SERVER_EXPIRED = "server_expired"
    SERVER_NOT_YET_VALID = "server_not_yet_valid"
    CLIENT_CERT_REFUSED = "client_cert_refused"
    NOT_TLS = "not_tls"
    HANDSHAKE_FAILED = "handshake_failed"


@dataclass(frozen=True, slots=True)
class Diagnosis:
    problem: Problem
    message: str


def diagnose(address: str, tls: Tls | None, *, timeout: float = 3.0) -> str | None:
    """One line saying why a channel to `address` ("host:port") with `tls` fails, or None
    when the server is there and the TLS handshake (both certificates) succeeds."""
    found = probe(address, tls, timeout=timeout)
    return found.message if found else None


def probe(address: str, tls: Tls | None, *, timeout: float = 3.0) -> Diagnosis | None:
    """`diagnose`, with the kind of problem for callers that add their own advice."""
    host, port = _split(address)
    if tls is not None:
        try:
            context = _context(tls)
        except (OSError, ssl.SSLError, ValueError) as error:
            return Diagnosis(Problem.CLIENT_FILES, _files_message(error))
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return Diagnosis(Problem.NOTHING_LISTENING, f"nothing is listening at {address}")
    except TimeoutError:
        return Diagnosis(Problem.UNREACHABLE, f"no answer from {address} within {timeout:g} s")
    except OSError as error:
        return Diagnosis(Problem.UNREACHABLE, f"cannot reach {address}: {_reason(error)}")
    with raw:
        if tls is None:
            return None
        return _handshake(context, raw, address, tls.server_name or host)


def _split(address: str) -> tuple[str, int]:
    target = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _context(tls: Tls) -> ssl.SSLContext:
    if (tls.cert is None) != (tls.key is None):
        raise ValueError("give both cert and key, or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _readable(tls.ca, "CA file")
    context.load_verify_locations(cafile=str(tls.ca))
    if tls.cert is not None and tls.key is not None:
        _readable(tls.cert, "client certificate")
        _readable(tls.key, "client key")
        context.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    context.set_alpn_protocols(["h2"])
    return context


class _Unreadable(OSError):
    pass


def _readable(path: Path | str, what: str) -> None:
    try:
        Path(path).read_bytes()
    except OSError as error:
        raise _Unreadable(f"{what} {path}: {_reason(error)}") from error


def _files_message(error: Exception) -> str:
    if isinstance(error, _Unreadable):
        return str(error)
    if isinstance(error, ssl.SSLError) and error.reason == "KEY_VALUES_MISMATCH":
        return "the client key does not belong to the client certificate"
    return f"the TLS files cannot be loaded: {_reason(error)}"


def _handshake(
    context: ssl.SSLContext, raw: socket.socket, address: str, server_name: str
) -> Diagnosis | None:
    try:
        with context.wrap_socket(raw, server_hostname=server_name) as conn:
            # TLS 1.3 servers judge the client certificate after the client's handshake
            # ends: their verdict is the first thing to read.
            conn.sendall(_H2_PREFACE)
            answer = conn.recv(1)
    except ssl.SSLCertVerificationError as error:
        return _server_certificate(error, address, server_name)
    except ssl.SSLEOFError:
        return Diagnosis(
            Problem.HANDSHAKE_FAILED,
            f"the server at {address} hung up during the TLS handshake",
        )
    except ssl.SSLError as error:
        return _alert(error, address)
    except TimeoutError:
        return None  # Handshake done, the server quiet: not a TLS problem.
    except OSError as error:
        return Diagnosis(
            Problem.HANDSHAKE_FAILED, f"the TLS handshake with {address} failed: {_reason(error)}"
        )
    if not answer:
        # gRPC servers send no alert: they hang up on a client certificate they refuse.
        return Diagnosis(
            Problem.CLIENT_CERT_REFUSED,
            f"the server at {address} refused the client certificate (it hung up after the "
            "handshake: expired, not yet valid, or of a CA it does not trust)",
        )
    return None


def _server_certificate(
    error: ssl.SSLCertVerificationError, address: str, server_name: str
) -> Diagnosis:
    verify = str(error.verify_message or error.reason or error)
    lowered = verify.lower()
    if "mismatch" in lowered:
        return Diagnosis(
            Problem.SERVER_NAME_MISMATCH,
            f"the server certificate at {address} is not valid for the name {server_name!r}",
        )
    if "expired" in lowered:
        return Diagnosis(Problem.SERVER_EXPIRED, f"the server certificate at {address} expired")
    if "not yet valid" in lowered:
        return Diagnosis(
            Problem.SERVER_NOT_YET_VALID, f"the server certificate at {address} is not yet valid"
        )
    if "issuer" in lowered or "self-signed" in lowered or "self signed" in lowered:
        return Diagnosis(
            Problem.SERVER_UNKNOWN_CA,
            f"the server certificate at {address} is signed by a CA not in the CA file ({verify})",
        )
    return Diagnosis(
        Problem.HANDSHAKE_FAILED, f"the server certificate at {address} is refused: {verify}"
    )


# TLS alerts a server sends about the client certificate, by OpenSSL reason.
_CLIENT_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "its CA is unknown to the server",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server calls it bad (expired, not yet valid or unknown)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server cannot verify it",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the server does not accept its kind",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it is revoked",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires one and none was sent",
    "TLSV1_ALERT_ACCESS_DENIED": "the server denies it access",
    "TLSV1_ALERT_DECRYPT_ERROR": "its signature does not verify (a key of another certificate?)",
}


def _alert(error: ssl.SSLError, address: str) -> Diagnosis:
    reason = str(error.reason or "")
    if reason in _CLIENT_ALERTS:
        return Diagnosis(
            Problem.CLIENT_CERT_REFUSED,
            f"the server at {address} refused the client certificate: {_CLIENT_ALERTS[reason]}",
        )
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return Diagnosis(Problem.NOT_TLS, f"the server at {address} does not speak TLS")
    return Diagnosis(
        Problem.HANDSHAKE_FAILED,
        f"the TLS handshake with {address} failed: {reason.lower() or _reason(error)}",
    )


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
