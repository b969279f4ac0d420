"""The installed version, one source of truth: the package metadata (pyproject.toml)."""

import argparse
from importlib import metadata

DISTRIBUTION = "iris-python"

try:
    __version__ = metadata.version(DISTRIBUTION)
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"


def add_version_option(parser: argparse.ArgumentParser) -> None:
    """``--version`` for our commands: prints ``<prog> <version>`` and exits 0."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
