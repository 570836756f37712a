"""The README and the Makefile say what the code does."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_names_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [
        f"RAVEN_{name.upper()}"
        for name in Settings.model_fields
        if not re.search(rf"`RAVEN_{name.upper()}`", readme)
    ]
    assert missing == [], f"README.md lacks {missing}"


def test_make_help_lists_every_documented_target() -> None:
    makefile = (REPO / "Makefile").read_text()
    documented = re.findall(r"^([^\s:#]+):[^\n]*## ", makefile, flags=re.MULTILINE)
    shown = subprocess.run(
        ["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    listed = re.findall(r"^\s+(?:\x1b\[[0-9;]*m)?(\S+?)(?:\x1b\[0m)?\s", shown, flags=re.MULTILINE)
    assert "test-e2e" in documented
    assert sorted(listed) == sorted(documented)


def test_every_make_target_the_readme_names_exists() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z0-9_-]+):", makefile, flags=re.MULTILINE))
    named = set(re.findall(r"`make ([a-z0-9-]+)", (REPO / "README.md").read_text()))
    assert named and named <= targets, named - targets
