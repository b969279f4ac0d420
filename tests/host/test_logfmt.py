"""Tests for iris.logfmt, writing to real files that stand in for stderr and the journal,
in this process and from real irishost and iris-relay processes.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import journal_stream, wait_for

from iris.logfmt import configure_logging, tag_standard_streams
from iris.logs import ContextLog, HotRecord, LineBatch

PLAIN_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<rest>.*)")
# One syslog priority, as journald reads it, and not a second one after it.
TAGGED_LINE = re.compile(r"<[0-7]>(?!<[0-7]>).*")


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


class Sizes(LineBatch):
    """A line per size, rendered when written."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes

    def lines(self) -> list[str]:
        return [f"request cluster=echo size={size}" for size in self.sizes]


@pytest.mark.parametrize("journal", [False, True])
def test_a_batch_of_lines_is_written_as_lines_each_with_its_prefix(stream, journal):
    """The access log's records: one HotRecord, a line per message."""
    configure_logging("info", stream, environ=journal_stream(stream) if journal else {})
    access = logging.getLogger("irishost.access")
    batch = Sizes([1, 22, 333])
    access.handle(HotRecord(access.name, logging.INFO, batch))
    lines = written(stream)
    if not journal:
        lines = [PLAIN_LINE.fullmatch(line)["rest"] for line in lines]
    prefix = "<6>INFO" if journal else "INFO"
    assert lines == [
        f"{prefix} irishost.access: request cluster=echo size={size}" for size in (1, 22, 333)
    ]
    assert str(batch).splitlines() == [f"request cluster=echo size={s}" for s in (1, 22, 333)]


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


# -- text outside logging -----------------------------------------------------------------


def test_standard_streams_tag_each_line_once_however_it_is_written(stream, monkeypatch):
    monkeypatch.setattr(sys, "stderr", stream)
    tag_standard_streams(journal_stream(stream))
    tag_standard_streams(journal_stream(stream))  # a second call must not wrap twice

    sys.stderr.write("usage: irishost")
    sys.stderr.write(" -c CONFIG\n\nirishost: error: ")
    print("no config", file=sys.stderr)
    sys.stderr.write("<4>already tagged\n")
    sys.stderr.flush()

    stream.seek(0)
    assert stream.read().splitlines() == [
        "<3>usage: irishost -c CONFIG",
        "<3>",
        "<3>irishost: error: no config",
        "<4>already tagged",
    ]


def test_standard_streams_elsewhere_stay_as_they_are(stream, monkeypatch):
    monkeypatch.setattr(sys, "stderr", stream)
    tag_standard_streams({"JOURNAL_STREAM": "1:1"})
    assert sys.stderr is stream


def test_a_config_error_under_journald_is_an_error_entry(service):
    config = service.config(workers={"cuont": 2})

    host = service.start(journal=True, wait=False)

    assert host.wait_exit() == 3
    [line] = host.log().splitlines()
    assert line.startswith(
        f"<3>irishost: config error: {config}: workers.cuont: unknown key; known keys: count, "
    )


BROKEN_MODULE = """
import iris

raise RuntimeError("cannot import: the licence file is missing")


class Handler(iris.ServiceHandler):
    pass
"""


def test_a_worker_failing_to_start_under_journald_is_all_error_entries(service):
    """The reason a unit failed must show in ``journalctl -p err``, traceback and all."""
    (service.dir / "broken.py").write_text(BROKEN_MODULE)
    service.config(service={"handler": "broken:Handler"}, workers={"preload": False})

    host = service.start(journal=True, wait=False)

    assert host.wait_exit() == 4
    lines = host.log().splitlines()
    assert [line for line in lines if not TAGGED_LINE.fullmatch(line)] == []
    errors = [line for line in lines if line.startswith("<3>")]
    assert "<3>irishost: worker 0 failed to start" in errors
    assert "<3>Traceback (most recent call last):" in errors
    assert "<3>RuntimeError: cannot import: the licence file is missing" in errors


def start_with_journal(journal: Path, *command: str) -> subprocess.Popen:
    """Run ``command`` with stdout and stderr on ``journal``, standing in for journald."""
    with open(journal, "w") as stream:
        return subprocess.Popen(
            [sys.executable, *command],
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=stream,
            env={**os.environ, **journal_stream(stream)},
        )


def test_a_usage_error_under_journald_is_an_error_entry(tmp_path):
    journal = tmp_path / "journal.log"

    code = start_with_journal(journal, "-m", "irishost", "--workers", "2").wait(20)

    lines = journal.read_text().splitlines()
    assert code == 2
    assert lines[0].startswith("<3>usage: irishost ")
    assert lines[-1] == "<3>irishost: error: the following arguments are required: -c/--config"
    assert [line for line in lines if not TAGGED_LINE.fullmatch(line)] == []


def test_iris_relay_under_journald_tags_every_line(tmp_path):
    journal = tmp_path / "journal.log"

    relay = start_with_journal(journal, "-m", "iris.relay", "--port", "0")
    try:
        wait_for(lambda: "listening on" in journal.read_text(), what="the relay to listen")
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(10) == 0

    lines = journal.read_text().splitlines()
    assert lines[0].startswith("<6>iris-relay: listening on 127.0.0.1:")
    assert [line for line in lines if not TAGGED_LINE.fullmatch(line)] == []


RETARGET = """
import logging, sys
from pathlib import Path
from iris.logfmt import configure_logging, start_log_writer, stop_log_writer
configure_logging("info", file=Path(sys.argv[1]))
start_log_writer()
log = logging.getLogger("retarget")
for n in range(2000):
    log.info("line %d", n)
configure_logging("info")  # as a reload does: the writer takes a new output
log.info("after")
stop_log_writer()
"""


def test_lines_gathered_by_the_writer_survive_a_change_of_output(tmp_path):
    """A reload reconfigures logging while the writer still holds lines it has
    not written yet (it writes them in batches): none may be lost."""
    target = tmp_path / "out.log"
    subprocess.run([sys.executable, "-c", RETARGET, str(target)], check=True, timeout=30)
    lines = target.read_text().splitlines()
    assert sum(" retarget: line " in line for line in lines) == 2000
    assert lines[-1].endswith("retarget: after")
