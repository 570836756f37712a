"""The CLI's TLS files, checked before connecting: RAVEN_TLS_* when set, else the development
certificates of `make certs`. Never creates any: a missing or out-of-date file is one line
saying which and what to do (TlsFilesError)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from raven_client import Tls

from cli.config import DEV_CA, DEV_CLI_CERT, DEV_CLI_KEY, ConnectionSettings

GET_CERTS = "`make certs` (or `raven certs`) creates them"


class TlsFilesError(Exception):
    """A TLS file the CLI cannot use; the message is the line to show."""


def resolve_tls(settings: ConnectionSettings) -> Tls | None:
    """The files of mutual TLS, checked; None in development plaintext mode."""
    if settings.insecure_dev:
        return None
    if settings.tls_cert_file or settings.tls_key_file or settings.tls_ca_file:
        tls = Tls(
            ca=_configured(settings.tls_ca_file, "RAVEN_TLS_CA_FILE"),
            cert=_configured(settings.tls_cert_file, "RAVEN_TLS_CERT_FILE"),
            key=_configured(settings.tls_key_file, "RAVEN_TLS_KEY_FILE"),
            server_name=settings.tls_server_name or None,
        )
        check_validity(Path(str(tls.cert)), "RAVEN_TLS_CERT_FILE")
        return tls
    directory = settings.dev_certs_dir.expanduser()
    files = [directory / name for name in (DEV_CA, DEV_CLI_CERT, DEV_CLI_KEY)]
    if not all(path.is_file() for path in files):
        raise TlsFilesError(
            f"no development certificates in {directory} (RAVEN_DEV_CERTS_DIR): {GET_CERTS}, "
            "or set RAVEN_TLS_CERT_FILE, RAVEN_TLS_KEY_FILE and RAVEN_TLS_CA_FILE"
        )
    ca, cert, key = files
    check_validity(cert, "RAVEN_DEV_CERTS_DIR", hint="; `raven certs --force` replaces them")
    return Tls(ca=ca, cert=cert, key=key, server_name=settings.tls_server_name or None)


def _configured(path: Path | None, setting: str) -> Path:
    if path is None:
        raise TlsFilesError(
            f"{setting} is not set: RAVEN_TLS_CERT_FILE, RAVEN_TLS_KEY_FILE and "
            "RAVEN_TLS_CA_FILE go together"
        )
    path = path.expanduser()
    if not path.is_file():
        raise TlsFilesError(f"{setting}: no such file {path}")
    try:
        path.read_bytes()
    except OSError as error:
        raise TlsFilesError(f"{setting}: cannot read {path} ({error.strerror})") from None
    return path


def check_validity(
    cert: Path, what: str, *, hint: str = "", now: dt.datetime | None = None
) -> None:
    """Raises TlsFilesError when the certificate in `cert` is expired or not yet valid."""
    # Only commands that connect pay for the import.
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except ValueError:
        raise TlsFilesError(f"{what}: {cert} is not a PEM certificate") from None
    now = now or dt.datetime.now(dt.UTC)
    if certificate.not_valid_after_utc < now:
        raise TlsFilesError(
            f"{what}: the client certificate {cert} expired on "
            f"{_when(certificate.not_valid_after_utc)}{hint}"
        )
    if certificate.not_valid_before_utc > now:
        raise TlsFilesError(
            f"{what}: the client certificate {cert} is not valid until "
            f"{_when(certificate.not_valid_before_utc)}{hint}"
        )


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")
