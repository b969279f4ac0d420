"""irishost.supervisor.memory in-process: a worker's process tree read from
/proc, with members that vanish meanwhile, and the pace of the costly reads.
Each test has a Family of its own, so no other test's look at /proc is reused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from irishost.supervisor.memory import PRIVATE_CPU_SHARE, Family, PrivatePace, ProcessTree, Usage

MiB = 2**20


@pytest.fixture
def child():
    """A child process that holds 50 MiB of private memory until killed."""
    script = "import sys; hoard = b'x' * (50 * 2**20); print(flush=True); sys.stdin.read()"
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    process.stdout.readline()  # its memory is written
    yield process
    process.kill()
    process.wait()


def test_a_tree_sums_its_members(child):
    family = Family(seconds=0.0)  # a fresh look at every read
    alone = ProcessTree(child.pid, family).usage()
    tree = ProcessTree(os.getpid(), family)  # this process, and the child under it

    assert alone.uss > 50 * MiB and alone.rss >= alone.pss >= alone.uss
    assert tree.usage().uss > alone.uss and tree.usage().pss > alone.pss
    assert tree.rss() > alone.rss


def test_a_member_that_vanished_counts_for_nothing(child):
    tree = ProcessTree(os.getpid(), Family(seconds=3600.0))  # the tree as first looked up
    with_child = tree.usage()

    child.kill()
    child.wait()  # reaped: /proc has no trace of it, though the tree still lists it

    without = tree.usage()
    assert without.uss < with_child.uss - 40 * MiB
    assert tree.rss() < with_child.rss - 40 * MiB


def test_a_worker_gone_before_it_was_seen_has_no_memory(child):
    child.kill()
    child.wait()

    tree = ProcessTree(child.pid, Family())

    assert tree.usage() == Usage(0, 0, 0)
    assert tree.rss() == 0


def test_private_reads_are_paced_by_their_cost():
    pace = PrivatePace()
    assert pace.due(0.0)

    pace.done(now=10.0, cpu=0.05)  # 16 workers of 216 MiB

    assert not pace.due(10.0 + 0.05 / PRIVATE_CPU_SHARE - 0.01)
    assert pace.due(10.0 + 0.05 / PRIVATE_CPU_SHARE)
