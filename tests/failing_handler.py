"""A handler that fails on request, shared by the hardening tests of the binding
(binding/test_binding_hardening.py), of iris.aio (binding/test_aio_hardening.py)
and of irishost (host/test_irishost_handler_hardening.py, which runs the source
of ``_fail``, ``_raise_for`` and their exceptions in its workers).
"""

from __future__ import annotations

import logging
import sys
import time

import pytest

import iris
from iris import codec

OVERSIZE = codec.MAX_MESSAGE + 1
LIMIT_TEXT = f"{OVERSIZE} bytes exceeds the relay's message limit of {codec.MAX_MESSAGE} bytes"


# What _fail's requests make the caller read.
FAULT_TEXTS = [
    (b"key", "KeyError: 'user'"),
    (b"exit", "SystemExit: 3"),
    (b"interrupt", "KeyboardInterrupt"),
    (b"unprintable", "UnprintableError"),
    (b"surrogates", "ValueError: caf?"),
]


class CustomStop(BaseException):
    """A BaseException of the user's own, outside the Exception tree."""


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken too")


def _fail(command: bytes) -> bytes:
    """The request handler of both the in-process and the irishost tests.

    ``echo:...`` answers the request, ``sleep:<seconds>`` after a while;
    anything else fails one particular way.
    """
    if command.startswith(b"echo"):
        return command
    if command.startswith(b"sleep:"):
        time.sleep(float(command.removeprefix(b"sleep:")))
        return command
    if command == b"big-reply":
        return bytes(OVERSIZE)
    if command == b"big-fault":
        raise ValueError("x" * OVERSIZE)
    if command == b"key":
        return {}["user"]
    if command == b"exit":
        sys.exit(3)
    if command == b"unprintable":
        raise UnprintableError
    if command == b"surrogates":
        raise ValueError(b"caf\xe9".decode("utf-8", "surrogateescape"))
    if command == b"interrupt":
        raise KeyboardInterrupt
    raise AssertionError(f"unknown command {command!r}")


def _raise_for(message: bytes) -> None:
    """Broadcast and event callbacks: raise a BaseException on request."""
    if message == b"system-exit":
        sys.exit(1)
    if message == b"keyboard-interrupt":
        raise KeyboardInterrupt
    if message == b"custom":
        raise CustomStop("custom stop")


def remote_fault(conn: iris.Connection, cluster: str, request: bytes, timeout=5.0) -> str:
    with pytest.raises(iris.RemoteError) as caught:
        conn.request(cluster, request, timeout)
    return caught.value.fault


def handler_errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
