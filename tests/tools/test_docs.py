"""The documentation stays inside the repository and agrees with the code.

Nothing may point outside the repository (the protocol and deployment facts
live in docs/); every relative link resolves; the deployment guide's config
snippet is a valid irishost config and the unit it installs exists.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from irishost.config import load_config

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "deploy-multi-machine.md"
# Generated or foreign: version control, environments, caches, build output.
SKIPPED_DIRS = {
    ".git",
    ".venv",
    ".venv-test",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
}
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


# --- the guide's commands, as far as they can be checked without a node -------------------

# Where the README's systemd section installs this project, and its units run it from.
VENV_BIN = "/opt/irishost/venv/bin"
OUR_COMMANDS = {"iris", "irishost", "iris-relay"}
UNITS = ROOT / "systemd"


def shell_blocks(document: Path) -> list[str]:
    """The ```sh blocks of ``document``, list-item indentation removed."""
    blocks = re.findall(r"^( *)```sh\n(.*?)^\1```", document.read_text(), re.S | re.M)
    return [textwrap.dedent(indent + body) for indent, body in blocks]


def unit_setting(unit: str, key: str) -> str:
    values = re.findall(rf"^{key}=(.*)$", (UNITS / unit).read_text(), re.M)
    assert len(values) == 1, f"{unit}: {key} set {len(values)} times"
    return values[0]


@pytest.mark.parametrize("document", ["README.md", "docs/deploy-multi-machine.md"])
def test_shell_blocks_are_valid_shell(document):
    for block in shell_blocks(ROOT / document):
        result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert result.returncode == 0, f"{document}:\n{block}\n{result.stderr}"


def test_guide_runs_this_project_from_the_one_place_it_is_installed():
    """The guide once installed ``iris`` in one place and ran it from another."""
    assert f"python3 -m venv {VENV_BIN.removesuffix('/bin')}\n" in (ROOT / "README.md").read_text()
    for unit in ("irishost@.service", "iris-relay.service"):
        assert unit_setting(unit, "ExecStart").startswith(f"{VENV_BIN}/"), unit
    wrong = []
    for block in shell_blocks(GUIDE):
        directory = ""
        for line in block.splitlines():
            words = line.split()
            if words[:1] == ["cd"]:
                directory = words[1]
            command = words[0] if words else ""
            if Path(command).name not in OUR_COMMANDS:
                continue
            where = directory if command.startswith("./") else str(Path(command).parent)
            if where != VENV_BIN:
                wrong.append(line)
    assert not wrong, wrong


def test_guide_subcommands_exist():
    iris = Path(sys.executable).parent / "iris"
    subcommands = {
        line.split()[1]
        for block in shell_blocks(GUIDE)
        for line in block.splitlines()
        if line.split()[:1] in ([f"{VENV_BIN}/iris"], ["./iris"])
    }
    assert subcommands >= {"keygen", "request", "bench", "subscribe", "publish"}
    for subcommand in sorted(subcommands):
        result = subprocess.run([iris, subcommand, "--help"], capture_output=True, text=True)
        assert result.returncode == 0, f"iris {subcommand}: {result.stderr}"


def test_guide_builds_the_node_in_gopath_mode_with_its_imports_fixed():
    """A plain build of the node fails on a current Debian; the guide's does not."""
    build = next(block for block in shell_blocks(GUIDE) if "go build" in block)
    assert "GO111MODULE=off" in build
    assert "s|code.google.com/p/go.crypto/hkdf|golang.org/x/crypto/hkdf|" in build
    assert re.search(r"cp -r /usr/share/gocode/src/github.com/inconshreveable/log15 \\\n"
                     r"\s+\"\$src/gopkg.in/inconshreveable/log15.v2\"", build)  # fmt: skip
    stub = re.search(r"cat > proto/bootstrap/gce.go <<'STUB'\n(.*?)\nSTUB\n", build, re.S)
    assert stub is not None
    assert "package bootstrap" in stub[1]
    for function in ("func detectGoogleComputeEngine() bool", "func updateIPNet("):
        assert function in stub[1]


def test_guide_opens_the_bootstrap_ports():
    rules = [line for block in shell_blocks(GUIDE) for line in block.splitlines() if "nft " in line]
    assert any("udp dport '{ 14142, 27182, 31415 }' accept" in rule for rule in rules), rules
    assert "no fixed port" not in GUIDE.read_text()


def test_node_unit_stops_without_waiting_out_the_stop_timeout():
    """SIGINT hangs the node while a client is attached: SIGTERM, and the reason, in the unit."""
    assert unit_setting("iris-node@.service", "KillSignal") == "SIGTERM"
    unit = (UNITS / "iris-node@.service").read_text()
    assert "SIGINT hangs while any client is attached" in unit
    assert "(`KillSignal=SIGTERM`)" in GUIDE.read_text()


def test_guide_explains_the_etcd_warnings():
    text = " ".join(GUIDE.read_text().split())
    assert "`fetching etcd members failed` warnings, continuously. They are harmless" in text
