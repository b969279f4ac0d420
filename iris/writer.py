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
"""

from __future__ import annotations

import socket
import threading
from typing import NoReturn

from .errors import ClosedError

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

    __slots__ = ("_sock", "_outbox", "_lock", "_error")

    def __init__(self, sock: socket.socket):
        self._sock = sock
        # Appended to by senders, emptied from the front by the writer; list
        # append, slicing and del are each atomic, so no lock guards it.
        self._outbox: list[bytes] = []
        self._lock = threading.Lock()  # held by the thread writing
        self._error: OSError | None = None

    def send(self, data: bytes) -> None:
        """Queue ``data``; write it now unless another thread is writing."""
        if self._error is not None:
            self._raise_error()
        outbox = self._outbox
        if not outbox and self._lock.acquire(blocking=False):
            self._write(data)  # alone: no batch to join
        else:
            outbox.append(data)
            if len(data) <= SMALL_PACKET and len(outbox) <= OUTBOX_PACKETS:
                if not self._lock.acquire(blocking=False):
                    return  # the writer sends it with its batch
            else:
                self._lock.acquire()
        self._write_while_queued()
        if self._error is not None:
            self._raise_error()

    def hold(self, data: bytes, limit: int) -> bool:
        """Queue ``data`` for the next send or flush, without writing; False
        (and nothing queued) if it is large or ``limit`` packets are waiting.

        For a caller that knows a flush follows shortly; see ReplyHandoff.
        """
        if len(data) > SMALL_PACKET or len(self._outbox) >= limit or self._error is not None:
            return False
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
        if self._error is not None:
            outbox.clear()  # never to be sent: free them

    def _write(self, data: bytes) -> None:
        """One sendall; called holding the lock."""
        try:
            self._sock.sendall(data)
        except OSError as err:
            self._error = err
