"""Run an iris client program as another local user (``nobody``), for the
relay's permission tests.

Tests run as root. ``setpriv`` switches the user; the program must then be
readable by that user, and the repository (and pyenv's interpreter under
/root) may not be. So the ``iris`` package and the program are copied to a
directory of their own, mode 0755, and run with an interpreter ``nobody``
can execute (``python3 -s -E``: no user site, no PYTHONPATH; the program's
directory is first on sys.path). The ``iris`` package needs nothing but the
standard library.

Each line the program prints is one JSON value, read back with a timeout;
every process is killed at teardown.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT = Path(__file__).resolve().parent / "other_user_client.py"
SETPRIV = shutil.which("setpriv")
AS_NOBODY = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"]
INTERPRETERS = (os.path.realpath(sys.executable), "/usr/bin/python3")
LINE_TIMEOUT = 30.0  # a client as nobody starts a fresh interpreter; a loaded machine is slow at it


def skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("running a client as another user needs root")
    if SETPRIV is None:
        pytest.skip("no setpriv to run a client as another user (util-linux)")


class OtherUser:
    """Runs clients as ``nobody`` (or as root, with the same program)."""

    def __init__(self) -> None:
        skip_unless_possible()
        self.dir = Path(tempfile.mkdtemp(prefix="iris-other-user-"))
        shutil.copytree(ROOT / "iris", self.dir / "iris", ignore=shutil.ignore_patterns("*.pyc"))
        shutil.copy(CLIENT, self.dir / CLIENT.name)
        for path in [self.dir, *self.dir.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        self.python = self._interpreter()
        self.procs: list[subprocess.Popen[str]] = []

    def _interpreter(self) -> str:
        for python in INTERPRETERS:
            check = [python, "-c", "import sys; assert sys.version_info >= (3, 11)"]
            if subprocess.run([SETPRIV, *AS_NOBODY, *check], capture_output=True).returncode == 0:
                return python
        pytest.skip(f"no Python 3.11+ that nobody may run among {INTERPRETERS}")

    def start(self, *args: str, as_nobody: bool = True) -> Client:
        """The client program with ``args``, as nobody (or as this user)."""
        program = [self.python, "-s", "-E", str(self.dir / CLIENT.name), *args]
        command = [SETPRIV, *AS_NOBODY, *program] if as_nobody else program
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.dir,
        )
        self.procs.append(proc)
        return Client(proc)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                assert stream is not None
                stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Client:
    """One running client program: its lines, and its end."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def line(self, timeout: float = LINE_TIMEOUT) -> object:
        """The program's next line, as the JSON value it printed."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while not select.select([self.proc.stdout], [], [], 0.05)[0]:
            if self.proc.poll() is not None:
                break  # its last line may have come since the select: readline tells
            if time.monotonic() > deadline:
                raise AssertionError(f"no line from the client; stderr: {self.stderr()}")
        text = self.proc.stdout.readline()
        if not text:
            raise AssertionError(f"the client ended; stderr: {self.stderr()}")
        return json.loads(text)

    def finish(self) -> None:
        """Close its stdin, which tells it to end, and wait for it."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(LINE_TIMEOUT)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()
