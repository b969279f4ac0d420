"""The supervisor's record of one worker process and the work it holds.

The records live in the :class:`~irishost.supervisor.worker_table.WorkerTable`, which
alone changes their state and their requests; this module is the record and
the one way to write to a worker (:meth:`WorkerHandle.put`).
"""

from __future__ import annotations

import enum
import itertools
import threading
import time

from ..wire.ring import Ring
from .memory import ProcessTree


class WorkerState(enum.StrEnum):
    """Where a worker is in its life; the allowed changes are WorkerTable's."""

    BOOTING = "booting"  # forked; importing the handler or in init()
    READY = "ready"  # takes work
    DRAINING = "draining"  # retired: finishes what it holds, then exits


class WorkerUnreachable(Exception):
    """A frame could not be written to a worker: it is wedged, or its ring is closed.

    ``taken``: how many frames of a batch (WorkerHandle.put_batch) it took first.
    """

    def __init__(self, message: str, taken: int = 0):
        super().__init__(message)
        self.taken = taken


# A frame for a worker that cannot take it within this long is given up on:
# the worker is wedged, and the caller gets a fault rather than a hang.
PUT_TIMEOUT = 1.0
# Broadcasts and events are best effort: a worker gets this long to take one.
BEST_EFFORT_TIMEOUT = 0.05
# A worker that let a frame time out is passed over this long, or until it
# answers again, so that one wedged worker costs the relay reader one wait
# per period, not one per frame.
STALL_SECONDS = 1.0


class WorkerHandle:
    """A forked worker, seen from the supervisor.

    ``in_flight`` maps request ticket to (deadline, size) in dispatch order; a
    worker's pool is first-in first-out, so the entries its handler threads
    can be running are the first ones, which is what stuck detection looks at.
    """

    def __init__(self, slot: int, pid: int, inbox: Ring, outbox: Ring, max_requests: int):
        self.slot = slot  # the worker's number, kept by its replacements
        self.pid = pid
        self.inbox = inbox  # supervisor -> worker
        self.outbox = outbox  # worker -> supervisor
        self.max_requests = max_requests  # 0: never recycle by count
        self.state = WorkerState.BOOTING  # changed by WorkerTable.transition only
        self.generation = 0  # which reload of the config it was started from
        self.started = time.monotonic()
        self.in_flight: dict[int, tuple[float, int]] = {}
        self.in_flight_bytes = 0
        self.served = 0
        self.tunnels: set[int] = set()
        self.failure: str | None = None  # traceback from a FAILED frame
        self.kill_reason: str | None = None  # why the supervisor killed it, if it did
        self.broken = False  # it sent a frame that does not decode: nothing more is read
        self.drain_deadline = 0.0  # when DRAINING: killed if still alive after this
        self.stalled_until = 0.0  # passed over until then; see put()
        self.last_chosen = 0  # when it was last chosen for a request; see WorkerChoice
        self.memory = ProcessTree(pid)  # its memory, and its descendants'
        # Several supervisor threads write to the inbox. Reentrant: the relay's
        # reader holds it from booking a request to writing it (hold_inbox).
        self._put_lock = threading.RLock()

    def hold_inbox(self) -> None:
        """Keep other threads' frames out until :meth:`release_inbox`.

        The relay's reader books a request under the table's lock and writes
        it after. Held from the booking (under that lock) to the write, the
        request reaches the ring before a DRAIN that a retirement, which
        takes the table's lock to mark the worker, sends meanwhile; behind
        it, the worker could exit idle and leave the request unread.
        """
        self._put_lock.acquire()

    def release_inbox(self) -> None:
        self._put_lock.release()

    def put(self, frame: bytes, timeout: float = PUT_TIMEOUT) -> None:
        """Send a frame; WorkerUnreachable if the worker does not take it in time."""
        with self._put_lock:
            try:
                self.inbox.put(frame, timeout=timeout)
            except TimeoutError as err:
                self.stalled_until = time.monotonic() + STALL_SECONDS
                raise WorkerUnreachable(
                    f"{self} did not take a frame within {timeout:g} s"
                ) from err
            except (ValueError, OSError) as err:  # its ring was closed: it died meanwhile
                raise WorkerUnreachable(f"{self} is gone: {err}") from err

    def put_batch(self, frames: list[bytes]) -> None:
        """Send frames with one wake-up of the worker (Ring.put_batch).
        WorkerUnreachable, saying how many it took, if it did not take them all."""
        with self._put_lock:
            try:
                taken = self.inbox.put_batch(frames, PUT_TIMEOUT)
            except (ValueError, OSError) as err:  # its ring was closed: it died meanwhile
                raise WorkerUnreachable(f"{self} is gone: {err}") from err
            if taken < len(frames):
                self.stalled_until = time.monotonic() + STALL_SECONDS
                raise WorkerUnreachable(
                    f"{self} did not take a frame within {PUT_TIMEOUT:g} s", taken
                )

    def stalled(self, now: float) -> bool:
        """Whether a frame for it timed out lately (see STALL_SECONDS)."""
        return now < self.stalled_until

    def running_deadline(self, threads: int) -> float | None:
        """The earliest deadline among the requests its ``threads`` handler threads may run.

        Those are the first ``threads`` entries of ``in_flight``. Looking at the
        first entry alone would let a handler stuck next to a long, legitimate
        request go unnoticed until that request's deadline; looking at all of
        them would kill a worker for a request that merely expired in the
        queue, which the worker drops unstarted. A booting worker runs nothing.
        Call under the table's lock, as the relay's reader thread adds entries.
        """
        if self.state is WorkerState.BOOTING:
            return None
        running = itertools.islice(self.in_flight.values(), threads)
        return min((deadline for deadline, _ in running), default=None)

    def close(self) -> None:
        self.inbox.close()
        self.outbox.close()

    def __repr__(self) -> str:
        return f"worker {self.slot} (pid {self.pid})"
