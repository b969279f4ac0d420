"""The reply wake chain (iris.handoff), with real threads and a real socket pair.

The chain must wake every answered caller exactly once, keep going when a
caller in it has given up, and send the requests it held back when it ends.
"""

from __future__ import annotations

import random
import select
import socket
import threading
import time

import pytest

from iris import ClosedError, TimeoutError
from iris.handoff import HELD_REQUESTS, ReplyHandoff, Waiter
from iris.send_buffer import DEFAULT_SEND_BUFFER
from iris.writer import SocketWriter

# Generous: a woken thread on a loaded 2-core machine can take a while to run.
WAKE_TIMEOUT = 10.0
# What callers wait for: longer than WAKE_TIMEOUT, so that a caller the chain
# forgot is caught still waiting rather than rescued by its own timeout.
CALLER_TIMEOUT = 3 * WAKE_TIMEOUT


@pytest.fixture
def handoff(socket_pair) -> ReplyHandoff:
    return ReplyHandoff(SocketWriter(socket_pair[0], DEFAULT_SEND_BUFFER))


def wait_in_threads(handoff: ReplyHandoff, waiters: list[Waiter], timeout=CALLER_TIMEOUT):
    """Start one thread per waiter blocked in handoff.wait; their outcomes by index."""
    outcomes: dict[int, object] = {}

    def caller(index: int) -> None:
        try:
            outcomes[index] = handoff.wait(waiters[index], timeout)
        except Exception as err:
            outcomes[index] = err

    threads = [start_thread(caller, i) for i in range(len(waiters))]
    return threads, outcomes


def start_thread(target, *args) -> threading.Thread:
    # daemon: a caller the chain forgot must not keep the test run alive
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def join(threads: list[threading.Thread]) -> None:
    deadline = time.monotonic() + WAKE_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a caller was never woken"


def test_one_read_worth_of_answers_wakes_every_caller_once(handoff):
    waiters = [Waiter() for _ in range(50)]
    threads, outcomes = wait_in_threads(handoff, waiters)
    for index, waiter in enumerate(waiters):
        handoff.deliver(waiter, f"answer {index}")
    handoff.wake()
    join(threads)
    assert outcomes == {i: f"answer {i}" for i in range(50)}


def test_answers_arriving_during_a_chain_join_it(handoff):
    waiters = [Waiter() for _ in range(40)]
    threads, outcomes = wait_in_threads(handoff, waiters)
    for start in range(0, 40, 5):  # eight reads of five answers each
        for index in range(start, start + 5):
            handoff.deliver(waiters[index], index)
        handoff.wake()
    join(threads)
    assert outcomes == {i: i for i in range(40)}


def test_an_exception_as_the_answer_is_raised(handoff):
    waiter = Waiter()
    handoff.deliver(waiter, ClosedError("gone"))
    handoff.wake()
    with pytest.raises(ClosedError, match="gone"):
        handoff.wait(waiter, WAKE_TIMEOUT)


def test_a_caller_that_gave_up_is_skipped_by_the_chain(handoff):
    gave_up = Waiter()
    with pytest.raises(TimeoutError):
        handoff.wait(gave_up, 0.01)
    later = [Waiter() for _ in range(3)]
    threads, outcomes = wait_in_threads(handoff, later)
    handoff.deliver(gave_up, "too late")  # the late answer must not take the chain's turn
    for index, waiter in enumerate(later):
        handoff.deliver(waiter, index)
    handoff.wake()
    join(threads)
    assert outcomes == {0: 0, 1: 1, 2: 2}


def test_an_answer_queued_but_not_yet_woken_is_returned_at_the_timeout(handoff):
    first, second = Waiter(), Waiter()
    handoff.deliver(first, "first")
    handoff.wake()  # wakes `first`, whose caller is not waiting yet: the chain is its
    handoff.deliver(second, "second")
    handoff.wake()  # the next read: `second` queues behind `first`
    # `second` times out while queued behind `first`: it has its answer anyway.
    assert handoff.wait(second, 0.01) == "second"
    assert handoff.wait(first, WAKE_TIMEOUT) == "first"


class WokenAsItTimesOut:
    """A waiter's real lock, with the reader's next read played at the worst
    moment: just after the caller's wait timed out, before it leaves the chain."""

    def __init__(self, handoff: ReplyHandoff, waiter: Waiter, then_ready: list[Waiter]):
        self._lock, self._handoff = waiter.lock, handoff
        self._waiter, self._then_ready = waiter, then_ready

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if timeout < 0:  # a plain acquire, not the caller's wait
            return self._lock.acquire(blocking)
        assert not self._lock.acquire(timeout=0.001)  # the timeout strikes
        for index, waiter in enumerate([self._waiter, *self._then_ready]):
            self._handoff.deliver(waiter, index)
        self._handoff.wake()  # wakes our waiter: the chain is now this caller's
        return False

    def release(self) -> None:
        self._lock.release()


def test_a_caller_woken_as_it_gives_up_passes_the_chain_on(handoff):
    """Otherwise everyone queued behind it would hang."""
    first, *behind = [Waiter() for _ in range(4)]
    threads, outcomes = wait_in_threads(handoff, behind)
    first.lock = WokenAsItTimesOut(handoff, first, behind)
    assert handoff.wait(first, 0.001) == 0  # its answer came with the wake-up
    join(threads)
    assert outcomes == {0: 1, 1: 2, 2: 3}


def test_a_caller_that_leaves_before_waiting_passes_the_chain_on(handoff):
    """An exception between sending a request and waiting for its answer."""
    gone, *behind = [Waiter() for _ in range(3)]
    threads, outcomes = wait_in_threads(handoff, behind)
    for index, waiter in enumerate([gone, *behind]):
        handoff.deliver(waiter, index)
    handoff.wake()  # wakes `gone`, whose caller will never wait
    assert handoff.cancel(gone)  # it had its answer
    assert not handoff.cancel(gone)  # a second cancel passes nothing on
    join(threads)
    assert outcomes == {0: 1, 1: 2}


def test_many_callers_with_timeouts_never_stall_the_chain(handoff):
    """Callers time out at random while answers arrive in random batches;
    every caller still waiting when its answer arrives gets it."""
    rng = random.Random(11)
    waiters = [Waiter() for _ in range(300)]
    timeouts = [rng.choice((0.0005, 0.002, CALLER_TIMEOUT, CALLER_TIMEOUT)) for _ in waiters]
    outcomes: dict[int, object] = {}

    def caller(index: int) -> None:
        try:
            outcomes[index] = handoff.wait(waiters[index], timeouts[index])
        except TimeoutError:
            outcomes[index] = "timeout"

    threads = [start_thread(caller, i) for i in range(len(waiters))]
    order = list(range(len(waiters)))
    rng.shuffle(order)
    while order:
        size = rng.randint(1, 20)
        batch, order = order[:size], order[size:]
        for index in batch:
            handoff.deliver(waiters[index], index)
        handoff.wake()
    join(threads)
    for index, timeout in enumerate(timeouts):
        if timeout == CALLER_TIMEOUT:
            assert outcomes[index] == index
        else:
            assert outcomes[index] in (index, "timeout")


def test_wake_all_wakes_every_answered_caller(handoff):
    waiters = [Waiter() for _ in range(10)]
    for index, waiter in enumerate(waiters):
        handoff.deliver(waiter, index)
    handoff.wake_all()
    assert [handoff.wait(w, 0.001) for w in waiters] == list(range(10))


def readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def test_requests_held_during_a_chain_go_out_when_it_ends(socket_pair, handoff):
    right = socket_pair[1]
    waiter = Waiter()
    handoff.deliver(waiter, "answer")
    handoff.wake()  # a chain runs until this waiter's caller passes it on
    assert handoff.hold(b"held one")
    assert handoff.hold(b"held two")
    assert not readable(right, 0.2), "a held request was written while the chain ran"
    assert handoff.wait(waiter, WAKE_TIMEOUT) == "answer"  # the chain ends here
    assert readable(right, WAKE_TIMEOUT)
    assert right.recv(100) == b"held oneheld two"


def test_without_a_chain_nothing_is_held(handoff):
    assert not handoff.hold(b"now")


def test_at_most_held_requests_are_held(handoff):
    waiter = Waiter()
    handoff.deliver(waiter, "answer")
    handoff.wake()
    assert all(handoff.hold(b"x") for _ in range(HELD_REQUESTS))
    assert not handoff.hold(b"one too many")
