"""Tests for iris.logfmt, writing to real files that stand in for stderr and the journal."""

from __future__ import annotations

import io
import logging
import os
import re

import pytest
from irishost_support import journal_stream

from iris.logfmt import configure_logging
from iris.logs import ContextLog

PLAIN_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<rest>.*)")


@pytest.fixture(autouse=True)
def restore_root_logger():
    """configure_logging changes process-wide state; put it back for the other tests."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = saved


@pytest.fixture
def stream(tmp_path):
    with open(tmp_path / "stderr.log", "w+") as file:
        yield file


def emit_all_levels() -> None:
    log = ContextLog(logging.getLogger("irishost.test")).new(service="primes")
    log.debug("probing", n=1)
    log.info("worker ready", worker=0, pid=123)
    log.warning("slow handler", seconds=2.5)
    log.error("worker died", how="killed by SIGKILL")
    log.critical("cannot continue")


def written(stream) -> list[str]:
    for handler in logging.getLogger().handlers:
        handler.flush()
    stream.seek(0)
    return stream.read().splitlines()


def test_plain_lines_carry_time_level_name_and_context(stream):
    configure_logging("info", stream, environ={})
    emit_all_levels()
    rests = [PLAIN_LINE.fullmatch(line)["rest"] for line in written(stream)]
    assert rests == [
        "INFO irishost.test: worker ready service=primes worker=0 pid=123",
        "WARNING irishost.test: slow handler service=primes seconds=2.5",
        'ERROR irishost.test: worker died service=primes how="killed by SIGKILL"',
        "CRITICAL irishost.test: cannot continue service=primes",
    ]


def test_journal_lines_carry_priority_and_no_time(stream):
    configure_logging("debug", stream, environ=journal_stream(stream))
    emit_all_levels()
    assert written(stream) == [
        "<7>DEBUG irishost.test: probing service=primes n=1",
        "<6>INFO irishost.test: worker ready service=primes worker=0 pid=123",
        "<4>WARNING irishost.test: slow handler service=primes seconds=2.5",
        '<3>ERROR irishost.test: worker died service=primes how="killed by SIGKILL"',
        "<2>CRITICAL irishost.test: cannot continue service=primes",
    ]


def test_journal_traceback_lines_each_carry_the_priority(stream):
    configure_logging("info", stream, environ=journal_stream(stream))
    try:
        raise ValueError("bad frame")
    except ValueError:
        logging.getLogger("irishost.test").exception("dispatch failed")
    lines = written(stream)
    assert lines[0] == "<3>ERROR irishost.test: dispatch failed"
    assert lines[1] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>ValueError: bad frame"
    assert all(line.startswith("<3>") for line in lines)


@pytest.mark.parametrize(
    "journal_stream",
    ["1:1", "not-a-number", "", "12345"],
    ids=["other-file", "garbage", "empty", "no-inode"],
)
def test_journal_stream_of_another_file_means_plain(stream, journal_stream):
    """A shell started from a unit inherits JOURNAL_STREAM but may log elsewhere."""
    configure_logging("info", stream, environ={"JOURNAL_STREAM": journal_stream})
    logging.getLogger("irishost.test").info("hello")
    [line] = written(stream)
    assert PLAIN_LINE.fullmatch(line)["rest"] == "INFO irishost.test: hello"


def test_stream_without_file_descriptor_means_plain():
    stream = io.StringIO()
    configure_logging("info", stream, environ={"JOURNAL_STREAM": "1:1"})
    logging.getLogger("irishost.test").info("hello")
    assert PLAIN_LINE.fullmatch(stream.getvalue().rstrip("\n"))["rest"] == (
        "INFO irishost.test: hello"
    )


def test_level_filters_and_reconfiguring_does_not_duplicate(stream):
    configure_logging("info", stream, environ={})
    configure_logging("warning", stream, environ={})  # as on a reload
    emit_all_levels()
    assert [PLAIN_LINE.fullmatch(line)["rest"].split()[0] for line in written(stream)] == [
        "WARNING",
        "ERROR",
        "CRITICAL",
    ]
