"""Where the local stack keeps its files by default: light enough for the CLI to import."""

from __future__ import annotations

from pathlib import Path

DEFAULT_DATA_DIR = Path(".data")
