"""How the supervisor chooses a worker for each request, in-process: real
worker records and rings, no fork (a choice only reads the records)."""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irishost.ops.metrics import Outcome
from irishost.supervisor.handle import WorkerHandle, WorkerState
from irishost.supervisor.worker_choice import WorkerChoice
from irishost.wire.ring import Ring

BOOTING, READY, DRAINING = WorkerState.BOOTING, WorkerState.READY, WorkerState.DRAINING
CAP = 1000  # request memory per worker, bytes


@pytest.fixture
def make_workers():
    made: list[WorkerHandle] = []

    def make(*states: WorkerState) -> list[WorkerHandle]:
        for state in states:
            worker = WorkerHandle(len(made), 10_000 + len(made), Ring.create(), Ring.create(), 0)
            worker.state = state
            made.append(worker)
        return made[-len(states) :]

    yield make
    for worker in made:
        worker.close()


def load(worker: WorkerHandle, requests: int, size: int = 1) -> None:
    """Give ``worker`` requests in flight, as booking them would."""
    for ticket in range(requests):
        worker.in_flight[ticket] = (0.0, size)
        worker.in_flight_bytes += size


def choose_all(workers: list[WorkerHandle], count: int, clock=None, size: int = 1) -> list:
    """The slots chosen for ``count`` requests of one read."""
    choice = WorkerChoice(workers, time.monotonic(), CAP, clock or itertools.count(1))
    return [choice.choose(size).slot for _ in range(count)]


def test_the_least_loaded_worker_is_chosen_and_counted(make_workers):
    a, b, c = make_workers(READY, READY, READY)
    load(a, 3)
    load(b, 1)
    load(c, 2)
    # b (1); b and c tie at 2, c chosen less recently; b (2); a, b, c tie at 3: a.
    assert choose_all([a, b, c], 4) == [1, 2, 1, 0]


def test_idle_workers_take_turns_across_reads(make_workers):
    workers = make_workers(READY, READY, READY)
    clock = itertools.count(1)
    first = choose_all(workers, 2, clock)
    second = choose_all(workers, 4, clock)  # the next read: loads counted afresh, all idle
    assert first == [0, 1]
    assert second == [2, 0, 1, 2]


def test_a_booting_worker_only_once_no_ready_one_has_room(make_workers):
    ready, booting = make_workers(READY, BOOTING)
    load(ready, 50)
    assert choose_all([ready, booting], 1) == [0]  # busier, but ready
    load(ready, 1, size=CAP)  # now at its memory limit
    assert choose_all([ready, booting], 1) == [1]


def test_no_ready_worker_at_all_means_the_request_waits(make_workers):
    workers = make_workers(BOOTING, BOOTING)
    assert WorkerChoice(workers, time.monotonic(), CAP, itertools.count(1)).choose(1) is None


def test_stalled_and_draining_workers_are_passed_over(make_workers):
    stalled, draining, idle = make_workers(READY, DRAINING, READY)
    stalled.stalled_until = time.monotonic() + 60
    load(idle, 10)
    assert choose_all([stalled, draining, idle], 3) == [2, 2, 2]


def test_when_every_open_worker_is_stalled_the_refusal_says_so(make_workers):
    workers = make_workers(READY, READY, DRAINING)
    for worker in workers[:2]:
        worker.stalled_until = time.monotonic() + 60
    refusal = WorkerChoice(workers, time.monotonic(), CAP, itertools.count(1)).choose(1)
    assert refusal.outcome is Outcome.NO_ROOM
    assert refusal.text == "all 2 workers are stalled: none took a frame in time lately"


def test_a_full_least_loaded_worker_hands_the_request_to_the_next_with_room(make_workers):
    full, busy, busier = make_workers(READY, READY, READY)
    load(full, 1, size=CAP - 10)
    load(busy, 5)
    load(busier, 9)
    choice = WorkerChoice([full, busy, busier], time.monotonic(), CAP, itertools.count(1))
    assert choice.choose(100).slot == 1
    assert choice.choose(5).slot == 0  # small enough for the least loaded again
    assert choice.choose(100).slot == 1
    # Loads now 2, 7 and 9: the heap kept its order through both paths.
    assert [choice.choose(1).slot for _ in range(6)] == [0, 0, 0, 0, 0, 1]


def test_a_request_no_worker_has_room_for_is_refused_with_the_limit(make_workers):
    a, b = make_workers(READY, READY)
    b.stalled_until = time.monotonic() + 60
    refusal = WorkerChoice([a, b], time.monotonic(), CAP, itertools.count(1)).choose(CAP + 1)
    assert refusal.outcome is Outcome.NO_ROOM
    assert refusal.text == (
        f"all 2 workers are at their request memory limit ({CAP} bytes each, "
        f"request is {CAP + 1} bytes) or stalled (1)"
    )


@settings(max_examples=150, deadline=None)
@given(
    workers=st.lists(
        st.tuples(
            st.sampled_from([BOOTING, READY, DRAINING]),
            st.integers(0, 4),  # requests in flight
            st.integers(0, CAP),  # their bytes
            st.booleans(),  # stalled
        ),
        min_size=1,
        max_size=5,
    ),
    sizes=st.lists(st.integers(1, CAP), max_size=12),
)
def test_every_choice_is_a_least_loaded_open_worker_with_room(workers, sizes):
    """Against the rule written out: ready before booting, then fewest in flight."""
    now = time.monotonic()
    handles = []
    try:
        for pid, (state, in_flight, size, stalled) in enumerate(workers, start=10_000):
            handle = WorkerHandle(len(handles), pid, Ring.create(), Ring.create(), 0)
            handle.state = state
            load(handle, in_flight)
            handle.in_flight_bytes = size
            handle.stalled_until = now + 60 if stalled else 0.0
            handles.append(handle)
        loads = {handle: len(handle.in_flight) for handle in handles}
        choice = WorkerChoice(handles, now, CAP, itertools.count(1))
        for size in sizes:
            chosen = choice.choose(size)
            open_ = [h for h in handles if h.state is not DRAINING]
            takers = [
                h for h in open_ if h.stalled_until <= now and h.in_flight_bytes + size <= CAP
            ]
            if not any(h.state is READY for h in open_):
                assert chosen is None
            elif not takers:
                assert chosen.outcome is Outcome.NO_ROOM
            else:
                rank = {h: (h.state is not READY, loads[h]) for h in takers}
                assert chosen in takers
                assert rank[chosen] == min(rank.values())
                loads[chosen] += 1
    finally:
        for handle in handles:
            handle.close()
