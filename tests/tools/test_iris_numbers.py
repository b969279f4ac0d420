"""Numbers on the ``iris`` and ``iris-relay`` command lines (issue 17).

Each bad value is refused by argparse in one line naming the flag and the
allowed range, exit 2, and no traceback: before, these raised OverflowError or
MemoryError, hung (``--linger nan``, ``--bits 100000``) or quietly did nothing
(``--seconds nan`` reported 0 requests, exit 0). No relay runs for these: the
refusal comes before any connection. Also here: the writes that cannot land
(``keygen > /dev/full``) and the terminal newline of ``iris request``.
"""

from __future__ import annotations

import ast
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port, read_terminal

import iris.tool
from iris.tool.exits import Exit

RUN_TIMEOUT = 30.0  # the old keygen --bits 100000 never finished: fail, do not hang
TOOL = Path(iris.tool.__file__).parent
MAX_FUNCTION_LINES = 80


def run(*args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=RUN_TIMEOUT,
        text=True,
    )


def assert_refused(done: subprocess.CompletedProcess, flag: str, allowed: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == Exit.USAGE, done.stderr
    assert f"argument {flag}: expected {allowed}" in done.stderr, done.stderr
    assert done.stdout == ""


SECONDS = "seconds from 0.001 to 86400"


@pytest.mark.parametrize(
    ("args", "flag", "allowed"),
    [
        (["request", "echo", "hi", "--timeout", "inf"], "--timeout", SECONDS),
        (["request", "echo", "hi", "--timeout", "1e12"], "--timeout", SECONDS),
        (["request", "echo", "hi", "--timeout", "nan"], "--timeout", SECONDS),
        (["request", "echo", "hi", "--timeout", "0"], "--timeout", SECONDS),
        (["--port", "99999", "request", "echo", "hi"], "--port", "a TCP port from 1 to 65535"),
        (["request", "echo", "hi", "--port", "0"], "--port", "a TCP port from 1 to 65535"),
        (["tunnel", "echo", "--linger", "nan"], "--linger", "seconds from 0 to 86400"),
        (["tunnel", "echo", "--linger", "-1"], "--linger", "seconds from 0 to 86400"),
        (["tunnel", "echo", "--timeout", "inf"], "--timeout", SECONDS),
        (["bench", "request", "echo", "--seconds", "nan"], "--seconds", SECONDS),
        (["bench", "publish", "news", "--seconds", "inf"], "--seconds", SECONDS),
        (["bench", "request", "echo", "--size", "1000000000000"], "--size", "bytes from 1 to"),
        (["bench", "publish", "news", "--size", "67108865"], "--size", "bytes from 1 to 67108864"),
        (["bench", "request", "echo", "--clients", "100000"], "--clients", "an integer from 1"),
        (["bench", "request", "echo", "--timeout", "nan"], "--timeout", SECONDS),
        (["subscribe", "news", "--count", "0"], "--count", "an integer of at least 1"),
        (["keygen", "--bits", "100000"], "--bits", "an integer from 2048 to 16384"),
        (["keygen", "--bits", "1024"], "--bits", "an integer from 2048 to 16384"),
    ],
)
def test_a_bad_number_for_iris_exits_2_naming_the_flag_and_range(args, flag, allowed):
    # A free port: were the number let through, the command would fail to
    # connect (exit 5) rather than pass by accident.
    if "--port" not in args:
        args = ["--port", str(free_port()), *args]
    assert_refused(run("iris.tool", *args), flag, allowed)


@pytest.mark.parametrize(
    ("args", "flag", "allowed"),
    [
        (["--port", "99999"], "--port", "a TCP port from 0 to 65535"),
        (["--handshake-timeout", "nan"], "--handshake-timeout", SECONDS),
        (["--packet-timeout", "1e12"], "--packet-timeout", SECONDS),
        (["--max-message", "-5"], "--max-message", "a size"),
        (["--outbound-cap", "0"], "--outbound-cap", "a size"),
        (["--outbound-budget", "2TiB"], "--outbound-budget", "a size"),
        (["--write-deadline", "inf"], "--write-deadline", SECONDS),
    ],
)
def test_a_bad_number_for_iris_relay_exits_2_naming_the_flag_and_range(args, flag, allowed):
    assert_refused(run("iris.relay", *args), flag, allowed)


def test_keygen_to_a_full_disk_fails_in_one_line():
    with open("/dev/full", "wb") as full:
        done = run("iris.tool", "keygen", stdout=full)
    assert done.returncode == Exit.FAILURE
    assert done.stderr == "iris: cannot write to stdout: No space left on device\n"


def test_keygen_to_a_directory_fails_in_one_line(tmp_path):
    for force in ([], ["--force"]):
        done = run("iris.tool", "keygen", "-o", str(tmp_path), *force)
        assert done.returncode == Exit.FAILURE
        assert done.stderr == f"iris: cannot write {tmp_path}: it is a directory\n"
    assert list(tmp_path.iterdir()) == []


def request_output(port: int, reply: str, stdout: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "iris.tool", "--port", str(port), "request", "echo", reply],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr


class Echo(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return request


def test_request_ends_the_reply_with_a_newline_on_a_terminal_only(relay, attach):
    attach.register(relay.port, "echo", Echo())
    controller, terminal = pty.openpty()
    try:
        request_output(relay.port, "no newline", terminal)
        request_output(relay.port, "has one\n", terminal)
        os.close(terminal)
        terminal = -1
        shown = read_terminal(controller, 1)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    # The terminal's own line discipline turns \n into \r\n.
    assert shown == b"no newline\r\nhas one\r\n"

    read, write = os.pipe()
    request_output(relay.port, "no newline", write)
    os.close(write)
    with os.fdopen(read, "rb") as piped:
        assert piped.read() == b"no newline"  # byte-exact when piped


def test_no_function_of_the_iris_command_is_over_80_lines():
    too_long = {}
    for path in sorted(TOOL.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    too_long[f"{path.name}:{node.lineno} {node.name}"] = size
    assert too_long == {}
