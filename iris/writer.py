"""Write-combining: many threads sending on one socket, few system calls.

With dozens of threads sending small packets on one connection, a lock held
around each ``sendall`` makes every sender queue for the lock and then for
the GIL it drops during the system call: several futex hand-offs and a
context switch per packet. Here a sender appends its bytes to a shared
outbox and, if no other thread is writing, becomes the writer and sends
whatever has gathered in one ``sendall``; if another thread is writing, that
thread sends these bytes too, and the sender returns at once.

    sender A --append--> outbox --sendall (one per batch)--> socket
    sender B --append--^   ^-- written by whichever sender holds the lock

What "sent" means is unchanged: the bytes are on their way and will be
written in order, as when ``sendall`` returned into the kernel's buffer.

The bytes waiting are counted against the connection's bound
(``iris.send_buffer``): those a sender leaves in the outbox, until they are
written, and those of a packet its own sender is writing, while that write
lasts (a write the peer has stalled leaves no room for the next). Over the
bound, ``wait_for_room`` blocks the caller, until a deadline if it has one.
The outbox's count is one integer under a plain lock held for an addition;
the count being written is set only by the thread holding the write lock,
so it needs none. A condition is waited on only over the bound.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import NoReturn

from .errors import ClosedError
from .send_buffer import no_room

# A packet larger than this is not left behind in the outbox: its sender
# waits until it is written, as with a plain sendall, so the outbox holds at
# most OUTBOX_PACKETS small packets (4 MiB) no matter how fast senders are.
# 64 KiB covers every request and reply of ordinary size and a tunnel chunk.
SMALL_PACKET = 64 * 1024 + 64
# Senders that find this many packets waiting wait for the writer instead of
# returning: the outbox's bound when the peer reads slower than we send.
OUTBOX_PACKETS = 64


class SocketWriter:
    """Sends packets from any thread on one socket, combining concurrent ones.

    Packets go out whole and in the order their ``send`` calls appended them.
    Once a write has failed, the writer and every later sender get ClosedError.
    """

    __slots__ = (
        "_sock",
        "_outbox",
        "_lock",
        "_error",
        "_bound",
        "_queued",
        "_writing",
        "_count_lock",
        "_room",
        "_waiting",
    )

    def __init__(self, sock: socket.socket, bound: int):
        self._sock = sock
        self._bound = bound
        self._queued = 0  # bytes left in the outbox, until written; under _count_lock
        self._writing = 0  # bytes of a packet its own sender is writing; set holding _lock
        # The counter's lock, entered directly where no one waits: a Condition's
        # own ``with`` runs Python code and cost 0.8 us a packet.
        self._count_lock = threading.Lock()
        self._room = threading.Condition(self._count_lock)
        self._waiting = 0  # callers in wait_for_room's wait: only then is there a notify
        # Appended to by senders, emptied from the front by the writer; list
        # append, slicing and del are each atomic, so no lock guards it.
        self._outbox: list[bytes] = []
        self._lock = threading.Lock()  # held by the thread writing
        self._error: OSError | None = None

    def has_room(self) -> bool:
        """Not over the bound: a sender need not :meth:`wait_for_room` (an
        unlocked read, as that method's own fast path)."""
        return self._queued + self._writing <= self._bound

    def wait_for_room(self, deadline: float | None = None) -> None:
        """Block while more than the bound is queued; iris.TimeoutError at
        ``deadline`` (``time.monotonic()``), ClosedError once a write failed.

        Called before a message is encoded and sent, so that a caller refused
        here has queued nothing.
        """
        if self._queued + self._writing <= self._bound:  # unlocked read: the fast path
            return
        with self._room:
            self._waiting += 1
            try:
                while self._queued + self._writing > self._bound and self._error is None:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise no_room(self._bound)
                    self._room.wait(remaining)
            finally:
                self._waiting -= 1
        if self._error is not None:
            self._raise_error()

    def send(self, data: bytes, deadline: float | None = None) -> None:
        """Queue ``data``; write it now unless another thread is writing.

        A large packet waits for the writer, until ``deadline`` if given; past
        it, the packet stays queued (and counted) for the writer to send.
        """
        if self._error is not None:
            self._raise_error()
        outbox = self._outbox
        if not outbox and self._lock.acquire(blocking=False):
            # Alone: no batch to join. The write is counted while it lasts.
            self._writing = len(data)
            self._write(data)
            self._writing = 0
            if self._waiting:
                self._unqueue(0)
        else:
            with self._count_lock:
                self._queued += len(data)
            outbox.append(data)
            if len(data) <= SMALL_PACKET and len(outbox) <= OUTBOX_PACKETS:
                if not self._lock.acquire(blocking=False):
                    return  # the writer sends it with its batch
            elif deadline is None:
                self._lock.acquire()
            elif not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return  # queued: the thread writing sends it
        self._write_while_queued()
        if self._error is not None:
            self._raise_error()

    def hold(self, data: bytes, limit: int) -> bool:
        """Queue ``data`` for the next send or flush, without writing; False
        (and nothing queued) if it is large or ``limit`` packets are waiting.

        For a caller that knows a flush follows shortly; see ReplyHandoff.
        """
        if (
            len(data) > SMALL_PACKET
            or len(self._outbox) >= limit
            or self._error is not None
            or self._queued + self._writing > self._bound
        ):
            return False
        with self._count_lock:
            self._queued += len(data)
        self._outbox.append(data)
        return True

    def flush(self) -> None:
        """Write what is queued unless another thread is writing it already.

        Never raises: a failed write fails the next send.
        """
        if self._outbox and self._lock.acquire(blocking=False):
            self._write_while_queued()

    def _write_while_queued(self) -> None:
        """Write until the outbox is empty; called holding the lock, releases it."""
        while True:
            try:
                self._write_outbox()
            finally:
                self._lock.release()
            # A sender may have appended after the last batch yet found the
            # lock still held; whoever takes the lock next writes its packet.
            # After a failed write nothing more can be sent: stop (the senders
            # get ClosedError), or this loop would spin over the leftovers.
            if self._error is not None or not self._outbox:
                return
            if not self._lock.acquire(blocking=False):
                return

    def _raise_error(self) -> NoReturn:
        raise ClosedError(f"connection lost: {self._error}") from self._error

    def _write_outbox(self) -> None:
        outbox = self._outbox
        while outbox and self._error is None:
            count = len(outbox)
            batch = outbox[0] if count == 1 else b"".join(outbox[:count])
            del outbox[:count]
            self._write(batch)
            self._unqueue(len(batch))
        if self._error is not None:
            outbox.clear()  # never to be sent: free them

    def _write(self, data: bytes) -> None:
        """One sendall; called holding the lock."""
        try:
            self._sock.sendall(data)
        except OSError as err:
            self._error = err
            self._unqueue(0)  # whoever waits for room finds the error

    def _unqueue(self, size: int) -> None:
        """``size`` queued bytes are written (or never will be): wake whoever waits."""
        with self._count_lock:
            self._queued -= size
            if self._waiting:
                self._room.notify_all()
