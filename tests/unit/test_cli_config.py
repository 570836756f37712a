"""The CLI reads its RAVEN_* variables itself (cli/config.py) the way shared.settings.Settings
does, and finds the development certificates per user, from any folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cli import config
from cli.config import CliConfig, ConfigError
from shared.auth.certs import DevCerts
from shared.paths import default_dev_certs_dir
from shared.settings import Settings

FIELDS = [field.name for field in dataclasses.fields(CliConfig)]


@pytest.fixture(autouse=True)
def _no_raven_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [*map(str.upper, (f"RAVEN_{f}" for f in FIELDS)), "XDG_CONFIG_HOME"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _as_settings(cli: CliConfig) -> dict[str, object]:
    return {name: getattr(cli, name) for name in FIELDS}


def test_the_defaults_are_the_settings_defaults() -> None:
    assert _as_settings(CliConfig.from_env()) == {
        name: getattr(Settings(), name) for name in FIELDS
    }


def test_every_variable_reads_as_settings_reads_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    values = {
        "RAVEN_TRAINING_RUNS_ADDR": "runs.example:443",
        "RAVEN_TRAINED_MODELS_ADDR": "models.example:443",
        "RAVEN_TLS_CERT_FILE": str(tmp_path / "c.crt"),
        "RAVEN_TLS_KEY_FILE": str(tmp_path / "c.key"),
        "RAVEN_TLS_CA_FILE": str(tmp_path / "ca.crt"),
        "RAVEN_TLS_SERVER_NAME": "backbone.example",
        "raven_insecure_dev": "Yes",
        "RAVEN_DEV_CERTS_DIR": str(tmp_path / "certs"),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    found = CliConfig.from_env()
    assert _as_settings(found) == {name: getattr(Settings(), name) for name in FIELDS}
    assert found.insecure_dev is True and found.tls_server_name == "backbone.example"


@pytest.mark.parametrize("value", ["maybe", "2", "enabled"])
def test_a_boolean_settings_refuses_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="RAVEN_INSECURE_DEV"):
        CliConfig.from_env({"RAVEN_INSECURE_DEV": value})


def test_the_certificates_live_in_the_users_config_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert default_dev_certs_dir() == tmp_path / "home" / ".config" / "raven" / "certs"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert CliConfig.from_env().dev_certs_dir == tmp_path / "xdg" / "raven" / "certs"
    assert Settings().dev_certs_dir == tmp_path / "xdg" / "raven" / "certs"
    # The XDG specification ignores a relative XDG_CONFIG_HOME.
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative")
    assert default_dev_certs_dir() == tmp_path / "home" / ".config" / "raven" / "certs"


def test_the_file_names_are_those_make_certs_writes(tmp_path: Path) -> None:
    dev = DevCerts(tmp_path)
    assert (config.DEV_CA, config.DEV_CLI_CERT, config.DEV_CLI_KEY) == (
        dev.ca.name,
        dev.cli.cert.name,
        dev.cli.key.name,
    )
