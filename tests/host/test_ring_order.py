"""The ring's memory ordering: which discipline a machine gets, and stress runs
between two real processes that catch a reordered or torn record.

This machine is x86-64, so the TSO discipline's runs here are its real test;
the KERNEL discipline is correct on any CPU by construction (the kernel's
locks order it), and its runs here prove the protocol that carries it. A
weakly ordered CPU cannot be had here, so the choice of discipline for one
is tested from the machine's name, in a real interpreter told that name.
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import time
import uuid

import pytest
import ring_stress
from ring_stress import SOUND_HERE

from irishost.wire import ring as ring_module
from irishost.wire.ordering import ENV_VARIABLE, Ordering, ordering_for
from irishost.wire.ring import DEFAULT_CAPACITY, KernelOrderedRing, Ring, TsoRing

STRESS_RECORDS = 1_000_000


@pytest.fixture
def prefix() -> str:
    return f"ringorder-{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------- choosing the discipline


@pytest.mark.parametrize("machine", ["x86_64", "amd64", "AMD64"])
def test_64_bit_x86_gets_the_fast_path(machine):
    assert ordering_for(machine, 64) is Ordering.TSO


@pytest.mark.parametrize(
    "machine",
    ["aarch64", "arm64", "armv7l", "ppc64le", "riscv64", "s390x", "loongarch64", "i686", ""],
)
def test_every_other_cpu_gets_the_kernel_path(machine):
    assert ordering_for(machine, 64) is Ordering.KERNEL


def test_a_32_bit_python_on_a_64_bit_x86_kernel_gets_the_kernel_path():
    """Its 8-byte indexes may be stored in two halves."""
    assert ordering_for("x86_64", 32) is Ordering.KERNEL


def test_the_operator_can_ask_for_the_kernel_path_but_not_for_the_fast_one():
    assert ordering_for("x86_64", 64, "kernel") is Ordering.KERNEL
    assert ordering_for("x86_64", 64, "auto") is Ordering.TSO
    assert ordering_for("x86_64", 64, "") is Ordering.TSO
    with pytest.raises(ValueError, match=ENV_VARIABLE):
        ordering_for("aarch64", 64, "tso")


CHOSEN = """
import platform
platform.machine = lambda: {machine!r}
from irishost.wire.ring import Ring
ring = Ring.create(4096, prefix={prefix!r})
ring.put(b"hello")
print(type(ring).__name__, ring.ordering.value, ring.get(timeout=1).decode())
ring.close()
"""


@pytest.mark.parametrize(
    "machine, chosen",
    [("aarch64", "KernelOrderedRing kernel"), ("x86_64", "TsoRing tso")],
)
def test_an_interpreter_on_a_machine_makes_rings_of_its_discipline(machine, chosen, prefix):
    """The whole choice, from the machine's name to the ring Ring.create
    returns, in a fresh interpreter told the name."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VARIABLE}
    script = CHOSEN.format(machine=machine, prefix=prefix)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [*chosen.split(), "hello"]


@pytest.mark.parametrize("ordering", list(Ordering))
def test_the_side_that_attaches_follows_the_creator_s_discipline(ordering, prefix):
    created, segment = Ring.create_shared(4096, prefix, ordering)
    attached = Ring.attach(segment, os.dup(created.data_fd), os.dup(created.space_fd), 4096)
    try:
        assert attached.ordering is created.ordering is ordering
        assert isinstance(attached, KernelOrderedRing) == (ordering is Ordering.KERNEL)
        created.put(b"across")
        assert attached.get(timeout=1) == b"across"
    finally:
        created.close()
        attached.close()


# --------------------------------------------------------------- stress runs


@pytest.mark.parametrize("ordering", SOUND_HERE, ids=lambda o: o.value)
def test_a_million_records_cross_two_processes_whole_and_in_order(ordering, prefix):
    ring = Ring.create(ring_stress.CAPACITY, prefix, ordering)
    try:
        with ring_stress.writer_process(ring, STRESS_RECORDS) as writer:
            assert ring_stress.read_records(ring, STRESS_RECORDS) is None
            writer.join(30)
            assert writer.exitcode == 0
        assert not ring.readable()
    finally:
        ring.close()


#: How long the broken writer below leaves a published record without its
#: payload: long enough for a reader on the other core, or one woken by the
#: eventfd on this one, to copy it out.
STALE_SECONDS = 0.002


class _PublishesBeforeThePayload(TsoRing):
    """The reordering W1 forbids, made on purpose: the length word, then the
    tail, then (a moment later) the payload. On a weakly ordered CPU a TSO
    ring could do this by itself."""

    def _write_record(self, tail: int, word: int, payload: bytes | memoryview) -> None:
        super()._write_record(tail, word, b"")
        self._publish(tail + ring_module._record_size(len(payload)))
        time.sleep(STALE_SECONDS)
        super()._write_record(tail, word, payload)


def test_the_stress_run_catches_a_record_published_before_its_payload(prefix):
    ring, segment = Ring.create_shared(ring_stress.CAPACITY, prefix, Ordering.TSO)
    try:
        mapping = mmap.mmap(segment, 0, mmap.MAP_SHARED)
    finally:
        os.close(segment)
    broken = _PublishesBeforeThePayload(
        mapping, ring.capacity, os.dup(ring.data_fd), os.dup(ring.space_fd)
    )
    try:
        with ring_stress.writer_process(broken, 2_000):
            problem = ring_stress.read_records(ring, 2_000)
        # A payload read before it was written is zeros (a record 0) or an
        # earlier lap's bytes: the sequence check or the byte check may be
        # the one that sees it first.
        assert problem is not None, "the stress run missed the reordering"
        assert "torn or stale" in problem or "out of order" in problem, problem
    finally:
        broken.close()  # this process's copy: the writer child has its own
        ring.close()


# ------------------------------------------------------------ a whole host


def test_a_host_on_the_kernel_path_serves_requests_of_every_size(service):
    """Supervisor and workers on KernelOrderedRing, as on aarch64: many small
    requests in flight, and one larger than a ring, fragmented both ways."""
    service.config(workers={"count": 2})
    service.start(env={ENV_VARIABLE: "kernel"})
    assert service.request(b"rings") == b"KernelOrderedRing KernelOrderedRing"
    small = [b"echo|%d" % i for i in range(500)]
    answers = [service.request_async(request) for request in small]
    large = b"echo|" + random.Random(7).randbytes(3 * DEFAULT_CAPACITY)
    assert service.request(large, timeout=20) == large
    assert [answer.result(timeout=20) for answer in answers] == small
