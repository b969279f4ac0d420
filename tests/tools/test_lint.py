"""Lint, format and types are part of the test command, so CI enforces them.

Each check runs the tool the test extra installs, from the interpreter's own
environment, over the whole repository with the settings in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECKS = {
    "ruff check": [sys.executable, "-m", "ruff", "check", "."],
    "ruff format": [sys.executable, "-m", "ruff", "format", "--check", "."],
    # strict on iris/ and irishost/: [tool.mypy] in pyproject.toml
    "mypy": [sys.executable, "-m", "mypy"],
}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_the_code_passes(check):
    done = subprocess.run(CHECKS[check], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{check} failed:\n{done.stdout}{done.stderr}"
