"""The documentation stays inside the repository and agrees with the code.

Nothing may point outside the repository (the protocol and deployment facts
live in docs/); every relative link resolves; the deployment guide's config
snippet is a valid irishost config and the unit it installs exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from irishost.config import load_config

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "deploy-multi-machine.md"
# Generated or foreign: version control, environments, caches, build output.
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
SKIPPED_SUFFIXES = (".egg-info", "build", "dist")
# What a reference to a file outside the repository looked like.
OUTSIDE = re.compile(r"\.\./shared/|/work/shared|PROTOCOL\.md|GO-RELAY\.md")


def repository_text_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        skipped = SKIPPED_DIRS.intersection(parts) or any(
            part.endswith(SKIPPED_SUFFIXES) for part in parts[:-1]
        )
        if skipped or not path.is_file():
            continue
        if path.suffix in {".py", ".md", ".toml", ".service", ".txt", ""}:
            files.append(path)
    return files


def test_nothing_refers_outside_the_repository():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in repository_text_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line) and path != Path(__file__)
    ]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    "document", ["README.md", "docs/protocol.md", "docs/deploy-multi-machine.md"]
)
def test_relative_links_resolve(document):
    path = ROOT / document
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text())
    assert links or document == "docs/protocol.md"
    missing = [link for link in links if not (path.parent / link).exists()]
    assert not missing, f"{document} links to missing files: {missing}"


def test_guide_config_snippet_is_a_valid_irishost_config(tmp_path):
    snippets = re.findall(r"```toml\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(snippets) == 1
    config_file = tmp_path / "primes.toml"
    config_file.write_text('[service]\ncluster = "primes"\nhandler = "primes:PrimeHandler"\n')
    config_file.write_text(config_file.read_text() + snippets[0])
    relay = load_config(config_file).relay
    assert (relay.port, relay.embedded, relay.connect_timeout) == (55555, False, 30.0)


def test_guide_names_files_that_exist():
    text = GUIDE.read_text()
    for path in re.findall(r"\b(systemd/[\w@.-]+\.service)\b", text):
        assert (ROOT / path).exists(), path
    assert "systemd/iris-node@.service" in text
