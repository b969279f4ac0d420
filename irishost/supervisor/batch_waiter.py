"""How the supervisor's loop waits for its workers' replies: spin first,
or sleep at once (see :class:`BatchWaiter`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..wire.ring import Ring, wait_readable

#: A turn that answers this many requests finds the machine busy (see BatchWaiter).
BUSY_REPLIES = 4


class BatchWaiter:
    """:func:`~irishost.wire.ring.wait_readable` for the supervisor's loop,
    spinning first only while that pays.

    A spin pays only while the peer runs on another core meanwhile. On two
    cores a loaded host keeps four processes busy (client, relay, supervisor,
    worker), so a spin that finds its answer has mostly kept the peer from a
    core. So after a busy turn (BUSY_REPLIES or more replies), a loop on a
    machine without a spare core sleeps at once; a quiet one still spins,
    which shortens a lone request's round trip.
    """

    def __init__(self) -> None:
        self._spare_core = spare_core()
        self._spin = True

    def wait(
        self, rings: Sequence[Ring], timeout: float | None, wake_fds: Sequence[int] = ()
    ) -> list[Ring]:
        return wait_readable(rings, timeout, wake_fds, self._spin)

    def after_turn(self, replies: int) -> None:
        self._spin = replies < BUSY_REPLIES or self._spare_core


def spare_core() -> bool:
    """Whether this process may run on more than two cores (see BatchWaiter)."""
    try:
        return len(os.sched_getaffinity(0)) > 2
    except AttributeError:  # not Linux
        return (os.cpu_count() or 1) > 2
