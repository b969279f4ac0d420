"""Tests for the unit files in systemd/: systemd's own checker, the directives we rely on,
and that a real irishost and iris-relay, traced with strace, make only the system calls
their unit's SystemCallFilter= allows and keep no IPC objects for RemoveIPC= to remove.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from support import free_port, wait_for

import iris
from irishost.supervisor.loop import Exit

UNITS = Path(__file__).resolve().parents[2] / "systemd"
HOST = "irishost@.service"
RELAY = "iris-relay.service"
NODE = "iris-node@.service"
INSTALLED_BIN = "/opt/irishost/venv/bin/"  # ours, in the deployment's venv
NODE_BIN = "/usr/local/bin/"  # the Go node, installed apart from our venv

# All units run untrusted-input network code; none may lose any of these (the
# node keeps all but the loopback-only ones: see test_node_unit_directives).
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
    "PrivateMounts": "yes",
    "ProtectProc": "invisible",
    "SystemCallErrorNumber": "EPERM",
    # Both talk to nothing but loopback (see the units' comments).
    "IPAddressDeny": ("any",),
    "IPAddressAllow": ("localhost",),
}

# Directives whose every line adds to a list: parse_unit gives their lines as a tuple.
LISTS = {"SystemCallFilter", "IPAddressDeny", "IPAddressAllow"}


def parse_unit(name: str) -> dict[str, dict[str, str | tuple[str, ...]]]:
    """section -> key -> value; enough for our files, which set each key once but LISTS."""
    sections: dict[str, dict[str, str | tuple[str, ...]]] = {}
    section = None
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        if key in LISTS:
            section[key] = (*section.get(key, ()), value)
            continue
        assert key not in section, f"{name}: {key} set twice"
        section[key] = value
    return sections


@pytest.fixture
def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed; cannot check the unit files")
    return found


@pytest.fixture
def verify(tmp_path, analyze):
    """``verify(*names)`` runs ``systemd-analyze verify`` on copies of our units.

    verify checks that every Exec*= binary exists, and irishost and iris-relay
    are not installed in /opt/irishost/venv here. The copies point ExecStart= at
    stub executables in a temporary directory instead, keeping the arguments.
    Returns (exit code, everything verify printed).
    """
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for program in ("irishost", "iris-relay", "iris-node"):
        (stubs / program).write_text("#!/bin/sh\nexit 0\n")
        (stubs / program).chmod(0o755)
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        installed = NODE_BIN if unit.name == NODE else INSTALLED_BIN
        assert installed in text, f"{unit.name} no longer runs from {installed}"
        (tmp_path / unit.name).write_text(text.replace(installed, f"{stubs}/"))

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
    assert service["ExecStart"] == "/opt/irishost/venv/bin/irishost -c /etc/irishost/%i.toml"
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
        "SystemCallFilter": ("@system-service", "~@privileged"),
        "RemoveIPC": "yes",
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
        "ExecStart": "/opt/irishost/venv/bin/iris-relay --port 55555 "
        "--permissions /etc/iris/relay-permissions.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",  # re-reads the permissions
        "Type": "exec",
        "Restart": "on-failure",
        "DynamicUser": "yes",  # implies RemoveIPC=yes
        "MemoryDenyWriteExecute": "yes",
        "ProcSubset": "pid",
        "SystemCallFilter": ("@system-service", "~@privileged @resources"),
        **HARDENING,
        # The permissions find each connection's user over NETLINK_SOCK_DIAG;
        # ProcSubset=pid hides their fallback, /proc/net/tcp.
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    }
    assert {key: service.get(key) for key in expected} == expected


def test_node_unit_passes_systemd_analyze_verify(verify):
    assert verify("iris-node@prod.service") == (0, "")


def test_node_unit_directives():
    unit = parse_unit(NODE)
    assert unit["Unit"]["Conflicts"] == RELAY  # both serve port 55555
    service = unit["Service"]
    # The node talks to other machines: no loopback-only IP rules, and no
    # system call filter (SystemCallErrorNumber= would go with one).
    network_only = {"IPAddressDeny", "IPAddressAllow", "SystemCallErrorNumber"}
    hardening = {key: value for key, value in HARDENING.items() if key not in network_only}
    hardening["RestrictAddressFamilies"] = "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    expected = {
        # Not /usr/local/bin/iris: that is our own command.
        "ExecStart": "/usr/local/bin/iris-node -net %i -rsa %d/network.pem -port 55555",
        "LoadCredential": "network.pem:/etc/iris/%i.pem",
        # SIGINT hangs the node while a client is attached: a stop would take 90 s.
        "KillSignal": "SIGTERM",
        "Type": "exec",
        "Restart": "on-failure",
        "DynamicUser": "yes",
        **hardening,
    }
    assert {key: service.get(key) for key in expected} == expected


# -- systemd-analyze security ----------------------------------------------------------------

# What `systemd-analyze security --offline=yes` rates the units (0 best, 10 worst) on
# systemd 252: 3.2 for both before SystemCallFilter=, IPAddressDeny=, ProtectProc=,
# PrivateMounts= and RemoveIPC=; 1.2 (irishost) and 1.1 (iris-relay) with them.
EXPOSURE = {"irishost@primes.service": 1.2, RELAY: 1.1}


@pytest.mark.parametrize("unit", sorted(EXPOSURE))
def test_exposure_stays_as_low_as_the_hardening_made_it(analyze, tmp_path, unit):
    copy = tmp_path / unit  # an instance for the template, as systemd would load it
    copy.write_text((UNITS / (HOST if unit.startswith("irishost@") else unit)).read_text())
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    if result.returncode != 0 and found is None:
        pytest.skip(f"this systemd-analyze cannot rate unit files offline: {result.stderr}")
    assert float(found[1]) <= EXPOSURE[unit], result.stdout


def test_readme_deploys_where_the_units_run_from_and_quotes_their_exposure():
    readme = (UNITS.parent / "README.md").read_text()
    deploy = readme[readme.index("## Deploying with systemd") :]
    venv = INSTALLED_BIN.removesuffix("/bin/")
    assert f"python3 -m venv {venv}\n" in deploy
    assert f"{INSTALLED_BIN}pip install ." in deploy
    assert "python3 -m pip install ." not in deploy  # refused on Debian 12 (PEP 668)
    quoted = " ".join(deploy.split())  # the scores sit in wrapped prose
    assert f"irishost@ {EXPOSURE['irishost@primes.service']} and iris-relay {EXPOSURE[RELAY]}" in (
        quoted
    )


# -- real processes under strace -------------------------------------------------------------

# One call per line of ``strace -f -o``, the pid first; anchored to the line's
# start so that a call's own data (a write's bytes) is never read as a call.
_TRACED_CALL = re.compile(r"^\d+ +(?:<\.\.\. )?([a-z0-9_]+)(?:\(| resumed>).*", re.MULTILINE)


def allowed_system_calls(analyze: str, unit: str) -> set[str]:
    """The calls the unit's SystemCallFilter= lines allow, groups expanded by systemd itself."""
    allowed: set[str] = set()
    for line in parse_unit(unit)["Service"]["SystemCallFilter"]:
        denied = line.startswith("~")
        calls = set().union(*(_expand(analyze, name) for name in line.lstrip("~").split()))
        allowed = allowed - calls if denied else allowed | calls
    return allowed


def _expand(analyze: str, name: str) -> set[str]:
    if not name.startswith("@"):
        return {name}
    listing = subprocess.run(
        [analyze, "syscall-filter", "--no-pager", name],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.splitlines()[1:]  # the first line is the group's own name
    entries = [entry.strip() for entry in listing]
    return set().union(*(_expand(analyze, e) for e in entries if e and not e.startswith("#")))


class Traced:
    """``command`` run under ``strace -f``; ``stop()`` sends SIGTERM to the command itself.

    strace blocks fatal signals while it runs a command (``-I 3``), so the signal
    goes to its child, and strace exits with the child's exit code.
    """

    def __init__(self, trace: Path, command: list[str]):
        strace = shutil.which("strace")
        if strace is None:
            pytest.skip("strace is not installed")
        self.trace = trace
        self.proc = subprocess.Popen(
            [strace, "-f", "-qq", "-o", str(trace), *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.program = wait_for(lambda: self._child(command), what=command)

    def _child(self, command: list[str]) -> psutil.Process | None:
        # Not just the first child: strace forks short-lived ones to probe ptrace.
        for child in psutil.Process(self.proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.cmdline() == command:
                    return child
        return None

    def stop(self) -> int:
        self.program.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            for process in psutil.Process(self.proc.pid).children(recursive=True):
                process.kill()
            self.proc.kill()
            self.proc.wait()

    def system_calls(self) -> dict[str, str]:
        """Each call made, with the first trace line that shows it."""
        calls: dict[str, str] = {}
        for match in _TRACED_CALL.finditer(self.trace.read_text()):
            calls.setdefault(match[1], match[0])
        return calls


def answered(service) -> bool:
    try:
        return bool(service.request(b"pid", 0.5))
    except iris.TimeoutError:
        return False


def connected(port: int) -> iris.Connection | None:
    try:
        return iris.connect(port)
    except ConnectionRefusedError:
        return None


def test_irishost_makes_only_system_calls_its_unit_allows(analyze, service, tmp_path):
    """Start, serve, scale, recycle, reload, status, metrics and stop, all under strace."""
    allowed = allowed_system_calls(analyze, HOST)
    metrics = free_port()
    service.config(
        workers={"count": 2, "preload": False},
        limits={"max_requests": 20},
        metrics={"port": metrics},
        topics=[{"name": "news"}],
    )
    traced = Traced(
        tmp_path / "irishost.trace",
        [sys.executable, "-m", "irishost", "-c", str(service.config_path)],
    )
    try:
        wait_for(lambda: answered(service), 60, what="a reply from the traced irishost")
        traced.program.send_signal(signal.SIGTTIN)
        traced.program.send_signal(signal.SIGHUP)
        for _ in range(50):
            service.request(b"pid", 20)
        service.conn.broadcast(service.cluster, b"broadcast")
        service.conn.publish("news", b"event")
        assert service.run("status").returncode == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=20) as page:
            assert page.status == 200
        assert traced.stop() == 0
    finally:
        traced.kill()

    calls = traced.system_calls()
    assert {call: line for call, line in calls.items() if call not in allowed} == {}


def test_iris_relay_makes_only_system_calls_its_unit_allows(analyze, tmp_path):
    """With a permissions file, as the unit runs it: the user look-up and a reload too."""
    allowed = allowed_system_calls(analyze, RELAY)
    port = free_port()
    permissions = tmp_path / "permissions.toml"
    permissions.write_text('default = "open"\n[topic.news]\npublish = ["*"]\n')
    command = [sys.executable, "-m", "iris.relay", "--port", str(port)]
    traced = Traced(tmp_path / "relay.trace", [*command, "--permissions", str(permissions)])
    try:
        client = wait_for(lambda: connected(port), 30, what="the traced relay")
        traced.program.send_signal(signal.SIGHUP)
        with client, iris.register(port, "echo", EchoHandler()):
            assert client.request("echo", b"hello", 10) == b"hello"
            client.publish("news", b"event")
        assert traced.stop() == 0
    finally:
        traced.kill()

    calls = traced.system_calls()
    assert {call: line for call, line in calls.items() if call not in allowed} == {}


class EchoHandler(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return request


def test_a_running_host_keeps_no_name_in_dev_shm_for_remove_ipc_to_take(service):
    """RemoveIPC=yes deletes the service user's /dev/shm entries when the unit stops; the
    rings are unlinked as they are made, so a host that is running owns none."""
    service.config(workers={"count": 2})
    host = service.start()
    host.proc.send_signal(signal.SIGTTIN)
    host.worker_count(3)

    assert service.request(b"pid")
    assert service.shm_leftovers() == []
