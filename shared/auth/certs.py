"""Development PKI: a CA, server and client certificates with one SPIFFE URI SAN each.

Production certificates come from the mesh (SPIRE, cert-manager, Istio); these
exist so that `make certs`, the dev stack and the tests take the secure path too.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "raven.local"
DEV_NAMESPACE = "raven"
SERVER_SA = "training-backbone"
CLI_SA = "cli"

Key = ec.EllipticCurvePrivateKey


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> Key:
    # P-256: as strong as RSA-3072 for our purposes and generated in microseconds.
    return ec.generate_private_key(ec.SECP256R1())


def new_ca(common_name: str = "raven dev CA", *, days: int = 3650) -> tuple[x509.Certificate, Key]:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca_cert: x509.Certificate,
    ca_key: Key,
    *,
    uris: Sequence[str],
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    server: bool = False,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[x509.Certificate, Key]:
    """A leaf certificate; `uris` normally holds exactly one SPIFFE id (tests pass more)."""
    key = new_key()
    now = _now()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        # SPIFFE leaves carry the identity in the URI SAN only; the subject is informative.
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (uris or ["leaf"])[0][:64])])
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_key(path: Path, key: Key) -> None:
    """Writes a private key readable by its owner only (0600 from the first byte on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(key_pem(key))


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert_pem(cert))


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(extension.value.get_values_for_type(x509.UniformResourceIdentifier))


@dataclass(frozen=True, slots=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class DevCerts:
    """The files `make certs` writes under one directory."""

    directory: Path
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server(self) -> KeyPair:
        return KeyPair(self.directory / "server.crt", self.directory / "server.key")

    @property
    def cli(self) -> KeyPair:
        return KeyPair(self.directory / "cli.crt", self.directory / "cli.key")

    @property
    def policy(self) -> Path:
        return self.directory / "policy.toml"

    @property
    def server_id(self) -> str:
        return spiffe_id(self.trust_domain, DEV_NAMESPACE, SERVER_SA)

    @property
    def cli_id(self) -> str:
        return spiffe_id(self.trust_domain, DEV_NAMESPACE, CLI_SA)

    def complete(self) -> bool:
        paths = (self.ca, self.ca_key, *_pair(self.server), *_pair(self.cli), self.policy)
        return all(p.exists() for p in paths)


def _pair(pair: KeyPair) -> tuple[Path, Path]:
    return pair.cert, pair.key


def ensure_dev_certs(directory: Path, *, force: bool = False) -> tuple[DevCerts, bool]:
    """The development CA, server and CLI certificates and a policy granting the CLI `admin`.

    Creates them when missing (or when `force`); returns (certs, created).
    """
    certs = DevCerts(directory.expanduser().resolve())
    if certs.complete() and not force:
        return certs, False
    certs.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(certs.directory, 0o700)
    ca_cert, ca_key = new_ca()
    write_key(certs.ca_key, ca_key)
    write_cert(certs.ca, ca_cert)
    server_cert, server_key = issue(
        ca_cert,
        ca_key,
        uris=[certs.server_id],
        # Compose service names too (deploy/docker-compose.yml), and NATS's: the one dev
        # server certificate serves every server of the local stack.
        dns_names=["localhost", "training-runs", "trained-models", "nats"],
        ip_addresses=["127.0.0.1", "::1"],
        server=True,
    )
    write_key(certs.server.key, server_key)
    write_cert(certs.server.cert, server_cert)
    cli_cert, cli_key = issue(ca_cert, ca_key, uris=[certs.cli_id])
    write_key(certs.cli.key, cli_key)
    write_cert(certs.cli.cert, cli_cert)
    certs.policy.write_text(
        "# Who may do what (shared/auth/policy.py). Reloaded when the file changes.\n"
        "[[grant]]\n"
        f'spiffe_id = "{certs.cli_id}"\n'
        'permissions = ["admin"]\n'
    )
    return certs, True
