"""The worker table's state machine and request tickets, in-process: real
rings and records, no fork (the table never forks or signals)."""

from __future__ import annotations

import os

import pytest

from irishost.supervisor.handle import WorkerHandle, WorkerState
from irishost.supervisor.worker_table import TRANSITIONS, Change, IllegalTransition, WorkerTable
from irishost.wire.ring import Ring

BOOTING, READY, DRAINING = WorkerState.BOOTING, WorkerState.READY, WorkerState.DRAINING


@pytest.fixture
def table():
    table = WorkerTable()
    yield table
    for worker in table.workers:
        table.remove(worker)
        worker.close()


def add_worker(table: WorkerTable, slot: int = 0) -> WorkerHandle:
    """A record for a worker played by this process (slot 0) or its parent (slot 1):
    the table needs only distinct live pids."""
    pid = (os.getpid(), os.getppid())[slot]
    worker = WorkerHandle(slot, pid, Ring.create(), Ring.create(), 0)
    table.add(worker)
    return worker


@pytest.mark.parametrize(
    ("before", "change", "after"),
    [
        (BOOTING, Change.BOOTED, READY),
        (BOOTING, Change.RETIRED, DRAINING),
        (READY, Change.RETIRED, DRAINING),
        (DRAINING, Change.BOOTED, DRAINING),  # retired while booting: READY changes nothing
    ],
)
def test_allowed_transitions(table, before, change, after):
    worker = add_worker(table)
    worker.state = before
    assert table.transition(worker, change) is after
    assert worker.state is after


@pytest.mark.parametrize(
    ("before", "change"),
    [
        (state, change)
        for state in WorkerState
        for change in Change
        if (state, change) not in TRANSITIONS
    ],
)
def test_every_other_transition_is_a_bug_that_raises(table, before, change):
    worker = add_worker(table)
    worker.state = before
    with pytest.raises(IllegalTransition, match=f"is {before.value}: cannot be {change.value}"):
        table.transition(worker, change)
    assert worker.state is before


def test_the_illegal_pairs_are_the_ones_expected():
    illegal = {(s, c) for s in WorkerState for c in Change} - set(TRANSITIONS)
    assert illegal == {(READY, Change.BOOTED), (DRAINING, Change.RETIRED)}


def test_a_retired_booting_worker_is_never_in_the_ready_list(table):
    worker = add_worker(table)
    table.transition(worker, Change.RETIRED)
    table.transition(worker, Change.BOOTED)
    assert table.in_state(READY) == []
    assert table.in_state(DRAINING) == [worker]


def test_tickets_are_unique_and_settle_once(table):
    worker = add_worker(table)
    with table.lock:
        first = table.book(worker, conn=None, relay_id=7, deadline=1.0, size=10)
        second = table.book(worker, conn=None, relay_id=7, deadline=2.0, size=5)
    assert first != second
    assert table.in_flight() == 2 and worker.in_flight_bytes == 15

    held = table.settle(first)
    assert (held.worker, held.relay_id) == (worker, 7)
    assert table.settle(first) is None  # a late duplicate answer is ignored
    assert table.in_flight() == 1 and worker.in_flight_bytes == 5


def test_settle_all_settles_a_batch_once_each(table):
    worker = add_worker(table)
    with table.lock:
        tickets = [table.book(worker, None, rid, 1.0, 10) for rid in (1, 2, 3)]
    assert table.settle(tickets[1]) is not None
    settled = table.settle_all([*tickets, tickets[0]])
    assert [p and p.relay_id for p in settled] == [1, None, 3, None]
    assert table.in_flight() == 0 and worker.in_flight_bytes == 0
    assert settled[0].head == b"\x05\x01\x01"  # REPLY, the id's varint, success


def test_removing_a_dead_worker_hands_back_exactly_its_requests(table):
    dead, alive = add_worker(table, 0), add_worker(table, 1)
    with table.lock:
        held = [table.book(dead, None, rid, 1.0, 1) for rid in (1, 2)]
        kept = table.book(alive, None, 3, 1.0, 1)

    orphans = table.remove(dead)

    assert sorted(p.relay_id for p in orphans) == [1, 2]
    assert all(table.settle(ticket) is None for ticket in held)
    assert table.settle(kept).relay_id == 3
    assert table.workers == (alive,) and table.by_pid(dead.pid) is None
    dead.close()


def test_outboxes_follow_the_workers(table):
    first = add_worker(table, 0)
    assert table.outboxes() == {first.outbox: first}
    second = add_worker(table, 1)
    assert table.outboxes() == {first.outbox: first, second.outbox: second}
    table.remove(first)
    first.close()
    assert table.outboxes() == {second.outbox: second}


def test_running_deadline_ignores_a_booting_worker(table):
    worker = add_worker(table)
    with table.lock:
        table.book(worker, None, 1, 5.0, 1)
    assert table.running_deadline(worker, threads=1) is None
    table.transition(worker, Change.BOOTED)
    assert table.running_deadline(worker, threads=1) == 5.0
