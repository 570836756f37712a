"""Where the local stack keeps its files by default: light enough for the CLI to import."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = Path(".data")


def default_dev_certs_dir() -> Path:
    """The development certificates of `make certs`, per user and not per folder, so that
    the services' dev mode and the CLI find the same ones from anywhere:
    `$XDG_CONFIG_HOME/raven/certs`, else `~/.config/raven/certs`."""
    config_home = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG base directory specification ignores a relative XDG_CONFIG_HOME.
    base = Path(config_home) if os.path.isabs(config_home) else Path.home() / ".config"
    return base / "raven" / "certs"
