"""Tests for the unit files in systemd/: systemd's own checker, and the directives we rely on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from irishost.supervisor import Exit

UNITS = Path(__file__).resolve().parent.parent / "systemd"
HOST = "irishost@.service"
RELAY = "iris-relay.service"
NODE = "iris-node@.service"
INSTALLED_BIN = "/usr/local/bin/"

# All units run untrusted-input network code; neither may lose any of these.
HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "SystemCallArchitectures": "native",
}


def parse_unit(name: str) -> dict[str, dict[str, str]]:
    """section -> key -> value; enough for our files, which set each key once."""
    sections: dict[str, dict[str, str]] = {}
    section = None
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert key not in section, f"{name}: {key} set twice"
        section[key] = value
    return sections


@pytest.fixture
def verify(tmp_path):
    """``verify(*names)`` runs ``systemd-analyze verify`` on copies of our units.

    verify checks that every Exec*= binary exists, and irishost and iris-relay
    are not installed in /usr/local/bin here. The copies point ExecStart= at
    stub executables in a temporary directory instead, keeping the arguments.
    Returns (exit code, everything verify printed).
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; cannot verify the unit files")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for program in ("irishost", "iris-relay", "iris-node"):
        (stubs / program).write_text("#!/bin/sh\nexit 0\n")
        (stubs / program).chmod(0o755)
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        assert INSTALLED_BIN in text, f"{unit.name} no longer runs from {INSTALLED_BIN}"
        (tmp_path / unit.name).write_text(text.replace(INSTALLED_BIN, f"{stubs}/"))

    def run(*names: str) -> tuple[int, str]:
        result = subprocess.run(
            [analyze, "verify", "--man=no", *(str(tmp_path / name) for name in names)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return result.returncode, result.stdout + result.stderr

    return run


def test_units_pass_systemd_analyze_verify(verify):
    # verify reports unknown keys and unparsable values only as warnings and
    # still exits 0, so any output at all is a failure. A template is verified
    # through an instance, as systemd would load it.
    assert verify("irishost@primes.service", RELAY) == (0, "")


def test_verify_catches_mistakes(verify, tmp_path):
    """Guards the test above: a misspelt value must show up in verify's output."""
    broken = tmp_path / RELAY  # the copy verify() checks
    broken.write_text(broken.read_text().replace("Restart=on-failure", "Restart=on-falure"))
    assert "on-falure" in verify(RELAY)[1]


def test_host_unit_directives():
    unit = parse_unit(HOST)
    assert unit["Unit"]["After"] == "network.target iris-relay.service"
    assert unit["Unit"]["Wants"] == "iris-relay.service"
    service = unit["Service"]
    assert service["ExecStart"] == "/usr/local/bin/irishost -c /etc/irishost/%i.toml"
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "3 4",
        "KillMode": "mixed",
        "TimeoutStopSec": "35",
        "User": "irishost",
        "RuntimeDirectory": "irishost/%i",
        "RuntimeDirectoryMode": "0700",
        "MemoryDenyWriteExecute": "no",
        **HARDENING,
    }
    assert {key: service.get(key) for key in expected} == expected
    assert "LimitNOFILE" in service


def test_host_exit_codes_match_the_unit():
    """RestartPreventExitStatus= must name the codes that restarting cannot fix."""
    codes = parse_unit(HOST)["Service"]["RestartPreventExitStatus"].split()
    assert [int(code) for code in codes] == [Exit.CONFIG, Exit.HANDLER]


def test_relay_unit_directives():
    service = parse_unit(RELAY)["Service"]
    expected = {
        "ExecStart": "/usr/local/bin/iris-relay --port 55555",
        "Type": "exec",
        "Restart": "on-failure",
        "DynamicUser": "yes",
        **HARDENING,
    }
    assert {key: service.get(key) for key in expected} == expected


def test_node_unit_passes_systemd_analyze_verify(verify):
    assert verify("iris-node@prod.service") == (0, "")


def test_node_unit_directives():
    unit = parse_unit(NODE)
    assert unit["Unit"]["Conflicts"] == RELAY  # both serve port 55555
    service = unit["Service"]
    hardening = {**HARDENING, "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK"}
    expected = {
        # Not /usr/local/bin/iris: that is our own command.
        "ExecStart": "/usr/local/bin/iris-node -net %i -rsa %d/network.pem -port 55555",
        "LoadCredential": "network.pem:/etc/iris/%i.pem",
        "KillSignal": "SIGINT",
        "Type": "exec",
        "Restart": "on-failure",
        "DynamicUser": "yes",
        **hardening,
    }
    assert {key: service.get(key) for key in expected} == expected
