"""The RAVEN_* variables the CLI's connection needs, read without shared.settings (pydantic):
the same names and defaults as shared.settings.Settings (tests/unit/test_cli_config.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shared.paths import default_dev_certs_dir

DEFAULT_TRAINING_RUNS_ADDR = "127.0.0.1:50051"
DEFAULT_TRAINED_MODELS_ADDR = "127.0.0.1:50052"
# The names shared.auth.certs.DevCerts gives the CA and the CLI's pair, in dev_certs_dir.
DEV_CA = "ca.crt"
DEV_CLI_CERT = "cli.crt"
DEV_CLI_KEY = "cli.key"

# Pydantic's spelling of booleans, case-insensitive.
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


class ConfigError(ValueError):
    """A RAVEN_* variable the CLI cannot use; its message names it."""


class ConnectionSettings(Protocol):
    """What a connection reads: CliConfig, or shared.settings.Settings (the local stack)."""

    @property
    def training_runs_addr(self) -> str: ...
    @property
    def trained_models_addr(self) -> str: ...
    @property
    def tls_cert_file(self) -> Path | None: ...
    @property
    def tls_key_file(self) -> Path | None: ...
    @property
    def tls_ca_file(self) -> Path | None: ...
    @property
    def tls_server_name(self) -> str: ...
    @property
    def insecure_dev(self) -> bool: ...
    @property
    def dev_certs_dir(self) -> Path: ...


@dataclass(frozen=True, slots=True)
class CliConfig:
    training_runs_addr: str
    trained_models_addr: str
    tls_cert_file: Path | None
    tls_key_file: Path | None
    tls_ca_file: Path | None
    tls_server_name: str
    insecure_dev: bool
    dev_certs_dir: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CliConfig:
        """The configuration in `environ` (os.environ); names are case-insensitive, as
        for Settings; an empty value is no value. Raises ConfigError."""
        env = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}

        def text(name: str, default: str) -> str:
            return env.get(f"RAVEN_{name}") or default

        def path(name: str) -> Path | None:
            value = env.get(f"RAVEN_{name}", "")
            return Path(value) if value else None

        return cls(
            training_runs_addr=text("TRAINING_RUNS_ADDR", DEFAULT_TRAINING_RUNS_ADDR),
            trained_models_addr=text("TRAINED_MODELS_ADDR", DEFAULT_TRAINED_MODELS_ADDR),
            tls_cert_file=path("TLS_CERT_FILE"),
            tls_key_file=path("TLS_KEY_FILE"),
            tls_ca_file=path("TLS_CA_FILE"),
            tls_server_name=text("TLS_SERVER_NAME", ""),
            insecure_dev=_boolean("RAVEN_INSECURE_DEV", text("INSECURE_DEV", "false")),
            dev_certs_dir=path("DEV_CERTS_DIR") or default_dev_certs_dir(),
        )


def _boolean(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r}: expected true or false")
