"""Single-producer/single-consumer frame rings in shared memory.

The fork server creates one pair of rings per worker *before* forking it, so
the worker holds the same :class:`Ring` object: the shared mapping and the
two eventfds are inherited by ``fork``; the supervisor maps the same memory
from descriptors passed to it (:meth:`Ring.create_shared`,
:meth:`Ring.attach`).  Exactly one process writes a given ring (``put``)
and exactly one other process reads it (``get``, ``drain``).
Frames are opaque bytes here; the layer above encodes them.

Memory layout of one mapping (all integers little-endian)::

    offset 0     +-------------------------------+
                 | head            u64           |  bytes consumed; only the reader stores it
    offset 8     | ordering        u32           |  1 TSO, 2 KERNEL; stored once, by the creator
    offset 64    +-------------------------------+
                 | tail            u64           |  bytes produced; only the writer stores it
    offset 128   +-------------------------------+
                 | reader_waiting  u32           |  1 while the reader sleeps on data_fd
    offset 192   +-------------------------------+
                 | writer_waiting  u32           |  1 while the writer sleeps on space_fd
    offset 256   +-------------------------------+
                 | data: capacity bytes          |  records at tail % capacity, head % capacity
                 +-------------------------------+

Each header field has its own 64-byte cache line, so the two sides never
write to the same line (``ordering`` is written before either side runs).
``head`` and ``tail`` only grow; ``tail - head`` is the number of bytes in use.

A record is a 4-byte length word followed by the payload, padded so the
next record starts on an 8-byte boundary::

    | word: bit 31 = more fragments follow, bits 0-30 = payload length | payload | pad |

Records may run past the end of the data area and continue at its start;
the length word itself never straddles, because records are 8-aligned and
the capacity is a multiple of 8.  The word ``0xFFFFFFFF`` is an abort
record: the writer gave up in the middle of a fragmented frame and the
reader drops the fragments it has collected.

The ordering contract
---------------------
Four orderings keep a record whole; each is named for the access it protects:

- **W1, writer, store/store**: the record's bytes (length word, payload) are
  stored before the ``tail`` that covers them.
- **R1, reader, load/load**: ``tail`` is loaded before the record bytes it
  covers.
- **R2, reader, load/store**: the record's bytes are copied out before the
  ``head`` that frees them is stored (else the writer may overwrite them
  mid-copy).
- **W2, writer, load/store**: ``head`` is loaded before the bytes it freed
  are overwritten.

And one for waking, a Dekker handshake: a sleeper stores its ``*_waiting``
flag, then loads the index; a publisher stores the index, then loads the
flag (**K, store/load**, both sides). On the TSO ring a publisher that
finds ``reader_waiting`` raised lowers it as it signals ``data_fd``, so a
sleep costs the writer one ``eventfd_write`` however many frames it
publishes before the reader runs; the reader raises the flag again before
each sleep, and a lowering always comes with a signal, so none is lost.

Each side of one ring follows one of two disciplines, chosen per machine by
:mod:`irishost.wire.ordering` and recorded in the header so that the side
that attaches follows the same:

**TSO, x86-64 only: no fence for W1, R1, R2, W2.** x86-64 keeps stores in
order with stores (W1), loads with loads (R1), and stores after earlier loads
(R2, W2); the only reordering it allows is a load passing an earlier store
(K). So program order is enough for the four, and CPython keeps the
compiler from changing it: each index store, slice store and slice copy is
a separate call into the C code of ``memoryview``/``mmap``, run in bytecode
order, and no C compiler moves a memory access across a call it cannot see
through. The indexes are aligned 8-byte words, stored and loaded by one
instruction each (``memcpy`` of 8 bytes), so never seen half-written. K is
the one place that needs a fence: :func:`_fence`, a lock's atomic
read-modify-write (``lock cmpxchg``), a full barrier on x86.

**KERNEL, every other CPU (and on request): nothing in shared memory is
trusted.** aarch64, POWER and RISC-V reorder all four, and Python reaches
no fence instruction (C11's ``atomic_thread_fence`` is in libatomic, which
not every machine has; a lock's acquire-then-release is no full fence
there). So each index a peer must trust travels through the kernel: the
writer adds the bytes it publishes to ``data_fd`` (``eventfd_write``), and
the reader trusts only the bytes it has read back from there; the reader
adds the bytes it frees to ``space_fd``, and the writer trusts only what it
has read back from that. An eventfd's counter changes under its wait
queue's spinlock. The side that writes a count unlocks last, a release:
every access before it in that process is visible first, the writer's
record stores (W1) or the reader's copy (R2). The side that reads the count
locks first, an acquire: every access after it waits for it, the reader's
copy (R1) or the writer's overwrite (W2). A read that returns the count
took the lock after the write that added it, so the one happens before the
other.
The shared ``head`` and ``tail`` are still stored, as hints: a waiter spins
on them to learn that a count is worth a system call, never to read a
record. K disappears: every publication writes the eventfd, so a sleeper
polls it with no flag and no handshake. The price, measured in
BENCHMARKS.md: a system call per publication and two per batch read.

Wakeups (TSO) travel through eventfds, never through the data: a sleeper
sets its ``*_waiting`` flag, fences, re-checks the ring and polls its
eventfd; the other side publishes, fences, and writes the eventfd only when
it sees the flag set.  Before sleeping a waiter (either discipline) spins
for up to :data:`SPIN_SECONDS`, because a sleep/wake round trip through the
kernel costs tens of microseconds, far more than a peer that is busy
answering needs.  The spin shrinks when it keeps failing (see
``_Waiter``), so a loaded machine is not made busier.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import secrets
import select
import threading
import time
from array import array
from collections.abc import Callable, Sequence

import psutil

from .ordering import ORDERING, Ordering

__all__ = [
    "DEFAULT_CAPACITY",
    "KernelOrderedRing",
    "Ordering",
    "SPIN_SECONDS",
    "Ring",
    "TsoRing",
    "remove_stale_segments",
    "wait_readable",
]

DEFAULT_CAPACITY = 4 * 1024 * 1024

#: Longest time a waiter polls the ring before it goes to sleep on its
#: eventfd.  Long enough to cover a peer that answers a request straight away
#: (a few microseconds of Python per message), short enough that idle
#: processes cost nothing measurable.
SPIN_SECONDS = 100e-6
#: A spin budget that fails its way below this stops spinning altogether...
MIN_SPIN_SECONDS = 2e-6
#: ...except for one full-length probe this often, to notice when spinning
#: pays off again.  Bounds the waste on a busy machine to about 1% of a core.
SPIN_PROBE_INTERVAL = 0.01
#: Longest single sleep: a safety net only, since _fence() makes the wakeup
#: handshake sound. Short enough that a lost wakeup (a bug, say) is a delay
#: and not a hang; long enough that an idle process wakes once a second.
SLEEP_SLICE_SECONDS = 1.0

SHM_DIR = "/dev/shm"

HEADER_SIZE = 256
# Indexes into the header viewed as u64 and as u32 words.
_HEAD = 0
_TAIL = 64 // 8
_ORDERING = 8 // 4
_READER_WAITING = 128 // 4
_WRITER_WAITING = 192 // 4

_MORE = 1 << 31
_LENGTH_MASK = _MORE - 1
_ABORT = 0xFFFFFFFF
# The writer never uses the last few bytes for data, so an abort record can
# always be written, even into a ring the reader has stopped emptying.
_ABORT_RESERVE = 8
_MAX_CAPACITY = 1 << 31
# How the header's ordering word names each discipline.
_ORDERING_CODES = {Ordering.TSO: 1, Ordering.KERNEL: 2}


def _record_size(payload_len: int) -> int:
    return (payload_len + 4 + 7) & ~7


_FENCE_LOCK = threading.Lock()


def _fence() -> None:
    """A full memory barrier.

    Waking is a Dekker-style handshake: the publisher stores the index and
    then reads the sleeper's flag; the sleeper stores its flag and then reads
    the index. x86 may let a load overtake an earlier store, and then both
    sides miss each other and the wakeup is lost. Python has no fence, but
    taking and releasing a lock runs atomic read-modify-write instructions,
    which on x86 order all earlier stores before all later loads.
    """
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


def _take_count(fd: int) -> int:
    """Read an eventfd's counter, resetting it; 0 when it was empty."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class _Waiter:
    """Waits for a ring condition: spin first, then sleep on eventfds.

    Spinning pays off only while the peer runs and answers within the spin.
    When the cores are oversubscribed the peer may be waiting for the very
    core we spin on, and a peer that takes long to answer makes every spin
    wasted CPU.  So the spin adapts: a spin that ends empty-handed halves the
    next one, a spin that finds the condition doubles it, and once the budget
    drops below MIN_SPIN_SECONDS only a rare probe spins at all.
    """

    __slots__ = ("_spin_seconds", "_next_probe")

    def __init__(self) -> None:
        self._spin_seconds = SPIN_SECONDS
        self._next_probe = 0.0

    def wait(
        self,
        ready: Callable[[], bool],
        flags: Sequence[tuple[memoryview, int]],
        fds: Sequence[int],
        deadline: float | None,
        wake_fds: Sequence[int] = (),
        spin: bool = True,
        counted_fds: Sequence[int] = (),
    ) -> bool:
        """Return True once ``ready()`` or a ``wake_fds`` is readable, False if
        the deadline passed first. ``spin=False`` sleeps at once (see Ring.get).
        ``counted_fds`` wake the sleeper to look at ``ready()`` again, and keep
        their counts (``ready()`` collects them: KernelOrderedRing)."""
        if not spin:
            return _sleep_until(ready, flags, fds, deadline, wake_fds, counted_fds)
        now = time.monotonic()
        spin_seconds = self._spin_seconds
        if not spin_seconds and now >= self._next_probe:
            spin_seconds = SPIN_SECONDS
            self._next_probe = now + SPIN_PROBE_INTERVAL
        if spin_seconds:
            end = now + spin_seconds
            # A spin cut short by the deadline says nothing about the peer.
            cut_short = False
            if deadline is not None and deadline < end:
                end, cut_short = deadline, True
            while now < end:
                if ready():
                    self._spin_seconds = min(2 * spin_seconds, SPIN_SECONDS)
                    return True
                now = time.monotonic()
            if not cut_short:
                self._spin_seconds /= 2
                if self._spin_seconds < MIN_SPIN_SECONDS:
                    self._spin_seconds = 0.0
        return _sleep_until(ready, flags, fds, deadline, wake_fds, counted_fds)


def _sleep_until(
    ready: Callable[[], bool],
    flags: Sequence[tuple[memoryview, int]],
    fds: Sequence[int],
    deadline: float | None,
    wake_fds: Sequence[int] = (),
    counted_fds: Sequence[int] = (),
) -> bool:
    """Sleep on ``fds`` until ``ready()`` or the deadline; False on timeout.

    ``flags`` are the ``*_waiting`` words that tell the peers to write one of
    ``fds``.  Setting them before the final check of ``ready()`` closes the
    window in which a peer publishes after our check but before our sleep.
    """
    poller = select.poll()
    for fd in (*fds, *wake_fds, *counted_fds):
        poller.register(fd, select.POLLIN)
    while True:
        for words, index in flags:
            words[index] = 1
        _fence()
        try:
            if ready():
                return True
            if deadline is None:
                sleep = SLEEP_SLICE_SECONDS
            else:
                sleep = min(deadline - time.monotonic(), SLEEP_SLICE_SECONDS)
                if sleep <= 0:
                    return False
            # poll() takes whole milliseconds; round up so we never wake early.
            woken = False
            for fd, _events in poller.poll(int(sleep * 1000) + 1):
                if fd in wake_fds:
                    woken = True  # the caller reads its own descriptor
                elif fd not in counted_fds:
                    _take_count(fd)
            if woken:
                return True
        finally:
            for words, index in flags:
                words[index] = 0


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class Ring:
    """One direction of a supervisor/worker channel.

    Create it with :meth:`create` before forking; afterwards one process only
    writes and the other only reads, each from one thread at a time.
    Reader-side state (a frame whose fragments are still arriving) lives in
    the reader's copy of the object.  A ring belongs to one writer/reader
    pair for its whole life: give a restarted worker new rings rather than
    reusing the old ones.

    The record format and the algorithms are here; how an index is
    published, trusted and waited for is the discipline's (the module's
    ordering contract): :meth:`create` returns a :class:`TsoRing` where that
    is sound and a :class:`KernelOrderedRing` elsewhere.
    """

    ordering: Ordering
    #: The header words this side may trust (the writer: head; the reader: tail).
    _trusted: memoryview | array[int]
    # How a reader sleeps (_Waiter.wait): flags to set, fds to drain, fds to count.
    _wake_flags: tuple[tuple[memoryview, int], ...]
    _drained_fds: tuple[int, ...]
    _counted_fds: tuple[int, ...]

    def __init__(self, mm: mmap.mmap, capacity: int, data_fd: int, space_fd: int) -> None:
        self._mm = mm
        self._capacity = capacity
        #: Poll it for POLLIN, with other descriptors, to learn of new records.
        self.data_fd = data_fd
        self.space_fd = space_fd  # tells the writer that the reader made room
        view = memoryview(mm)
        self._hdr64 = view[:HEADER_SIZE].cast("Q")
        self._hdr32 = view[:HEADER_SIZE].cast("I")
        self._data = view[HEADER_SIZE:]
        self._words = self._data.cast("I")
        view.release()
        self._usable = capacity - _ABORT_RESERVE
        # Fragments are kept below a half of the ring so the writer can fill
        # one half while the reader copies out the other.
        self._max_fragment = capacity // 2 - 8
        self._fragments: list[bytes] = []
        self._data_waiter, self._space_waiter = _Waiter(), _Waiter()
        self._closed = False

    @classmethod
    def create(
        cls,
        capacity: int = DEFAULT_CAPACITY,
        prefix: str = "irishost",
        ordering: Ordering = ORDERING,
    ) -> Ring:
        """Create a ring in a private, already unlinked shared-memory segment."""
        ring, segment = cls.create_shared(capacity, prefix, ordering)
        os.close(segment)
        return ring

    @classmethod
    def create_shared(
        cls,
        capacity: int = DEFAULT_CAPACITY,
        prefix: str = "irishost",
        ordering: Ordering = ORDERING,
    ) -> tuple[Ring, int]:
        """:meth:`create`, and the segment's descriptor, to pass to another process
        (with ``data_fd`` and ``space_fd``) that maps it with :meth:`attach`.
        The caller closes the descriptor. ``ordering`` is for tests and
        benchmarks: the default is this machine's (irishost.wire.ordering)."""
        mm, segment = _create_segment(capacity, prefix)
        memoryview(mm)[:HEADER_SIZE].cast("I")[_ORDERING] = _ORDERING_CODES[ordering]
        data_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        space_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return _ring_class(ordering)(mm, capacity, data_fd, space_fd), segment

    @classmethod
    def attach(cls, segment: int, data_fd: int, space_fd: int, capacity: int) -> Ring:
        """Map a ring another process made with :meth:`create_shared`; takes
        over the three descriptors (the segment's is closed once mapped).
        Follows the ordering its creator chose, whatever this process's."""
        mm, ordering = _map_segment(segment, capacity)
        return _ring_class(ordering)(mm, capacity, data_fd, space_fd)

    # ------------------------------------------------------ the discipline's part

    def readable(self) -> bool:
        """True when at least one record is waiting.

        A record can be one fragment of a frame still being written, so a
        ring that is readable may still yield no complete frame.
        """
        raise NotImplementedError

    def arm(self) -> None:
        """Ask the writer to signal :attr:`data_fd` on its next publish.

        For callers that poll ``data_fd`` themselves: arm, check
        :meth:`readable`, poll, then :meth:`disarm`.
        """
        raise NotImplementedError

    def disarm(self) -> None:
        raise NotImplementedError

    def _publish(self, tail: int) -> None:
        """Make records up to ``tail`` visible, and wake a sleeping reader."""
        raise NotImplementedError

    def _wait_space(self, size: int, deadline: float | None) -> bool:
        raise NotImplementedError

    def _visible_tail(self) -> int:
        """The tail up to which the reader may read records."""
        raise NotImplementedError

    def _free(self, head: int) -> None:
        """Hand the bytes before ``head`` back to the writer, and wake it if it waits."""
        raise NotImplementedError

    @property
    def capacity(self) -> int:
        return self._capacity

    # ----------------------------------------------------------------- writer

    def put(self, frame: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Append one frame, waiting for the reader to make room if needed.

        Raises :class:`TimeoutError` when room did not appear in time.  A
        frame that fits in one record is then not written at all.  A larger
        frame goes out in fragments as the reader frees space; if the timeout
        hits after some of them, an abort record tells the reader to drop
        them.  Either way the ring stays usable and the frame is not
        delivered.
        """
        if type(frame) is not bytes:
            frame = memoryview(frame).cast("B")
        if len(frame) > self._max_fragment:
            self._put_fragmented(frame, _deadline(timeout))
            return
        hdr = self._hdr64
        tail = hdr[_TAIL]
        size = _record_size(len(frame))
        full = tail - self._trusted[_HEAD] + size > self._usable
        if full and not self._wait_space(size, _deadline(timeout)):
            raise TimeoutError("ring full: the reader did not make room in time")
        self._write_record(tail, len(frame), frame)
        self._publish(tail + size)

    def put_batch(self, frames: Sequence[bytes], timeout: float | None = None) -> int:
        """:meth:`put` each frame, publishing together those that fit; how many went in."""
        hdr, trusted, words, data = self._hdr64, self._trusted, self._words, self._data
        capacity, largest, usable = self._capacity, self._max_fragment, self._usable
        tail = hdr[_TAIL]
        for count, frame in enumerate(frames):  # _record_size and _write_record inline:
            size, pos = len(frame), tail % capacity  # this runs per request
            end = tail + ((size + 11) & ~7)
            if size <= largest and end - trusted[_HEAD] <= usable and pos + 4 + size <= capacity:
                words[pos >> 2] = size
                data[pos + 4 : pos + 4 + size] = frame
                tail = end
                continue
            self._publish(tail)  # what is written so far, before waiting for room
            try:
                self.put(frame, timeout)
            except TimeoutError:
                return count
            tail = hdr[_TAIL]
        self._publish(tail)  # one fence, and at most one wake-up, for the batch
        return len(frames)

    def _put_fragmented(self, frame: memoryview | bytes, deadline: float | None) -> None:
        view = memoryview(frame)
        step = self._max_fragment
        hdr = self._hdr64
        for start in range(0, len(view), step):
            chunk = view[start : start + step]
            more = _MORE if start + step < len(view) else 0
            size = _record_size(len(chunk))
            if not self._wait_space(size, deadline):
                if start:
                    self._write_abort()
                raise TimeoutError("ring full: the reader did not make room in time")
            tail = hdr[_TAIL]
            self._write_record(tail, more | len(chunk), chunk)
            self._publish(tail + size)

    def _write_abort(self) -> None:
        tail = self._hdr64[_TAIL]
        self._words[(tail % self._capacity) >> 2] = _ABORT
        self._publish(tail + _record_size(0))

    def _write_record(self, tail: int, word: int, payload: bytes | memoryview) -> None:
        capacity = self._capacity
        pos = tail % capacity
        self._words[pos >> 2] = word
        start = pos + 4
        end = start + len(payload)
        if end <= capacity:
            self._data[start:end] = payload
        else:
            first = capacity - start
            self._data[start:capacity] = payload[:first]
            self._data[: end - capacity] = payload[first:]

    # ----------------------------------------------------------------- reader

    def get_nowait(self) -> bytes | None:
        return next(iter(self._read(1)), None)

    def get(self, timeout: float | None = None, spin: bool = True) -> bytes | None:
        """Return the next frame, or None if none arrived within ``timeout``.

        Fragments of a frame that is not complete at the timeout stay with
        the reader and are joined by a later call. Pass ``spin=False`` while
        other threads of the process have work: a spin in Python holds the
        GIL, so they would wait for it to end.
        """
        deadline = _deadline(timeout)
        while True:
            frames = self._read(1)
            if frames:
                return frames[0]
            if not self._wait_data(deadline, spin):
                return None

    def drain(self, max_frames: int = 1024) -> list[bytes]:
        """Return every complete frame already in the ring, without blocking.

        This is the hot path for a busy reader: one call, one head update and
        at most one wakeup of the writer for a whole batch.
        """
        return self._read(max_frames)

    def _wait_data(self, deadline: float | None, spin: bool = True) -> bool:
        return self._data_waiter.wait(
            self.readable,
            self._wake_flags,
            self._drained_fds,
            deadline,
            spin=spin,
            counted_fds=self._counted_fds,
        )

    def _read(self, max_frames: int) -> list[bytes]:
        head = self._hdr64[_HEAD]
        tail = self._visible_tail()
        if head == tail:
            return []
        frames: list[bytes] = []
        capacity = self._capacity
        words = self._words
        mm = self._mm
        data_end = HEADER_SIZE + capacity
        while head != tail:
            pos = head % capacity
            word = words[pos >> 2]
            if word == _ABORT:
                self._fragments.clear()
                head += _record_size(0)
                continue
            length = word & _LENGTH_MASK
            start = HEADER_SIZE + pos + 4
            end = start + length
            if end <= data_end:
                payload = mm[start:end]
            else:  # the payload runs past the end of the data area
                payload = mm[start:data_end] + mm[HEADER_SIZE : end - capacity]
            head += (length + 11) & ~7  # _record_size(length), inlined
            if word & _MORE:
                self._fragments.append(payload)
                continue
            if self._fragments:
                self._fragments.append(payload)
                payload = b"".join(self._fragments)
                self._fragments.clear()
            frames.append(payload)
            if len(frames) >= max_frames:
                break
        self._free(head)
        return frames

    # -------------------------------------------------------------- lifecycle

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release this process's mapping and descriptors.

        The peer keeps its own; the memory goes away when the last process
        that maps it closes it or exits.
        """
        if self._closed:
            return
        self._closed = True
        for view in (self._hdr64, self._hdr32, self._words, self._data):
            view.release()
        self._mm.close()
        os.close(self.data_fd)
        os.close(self.space_fd)


class TsoRing(Ring):
    """A ring for x86-64: TSO in the module's ordering contract. The shared
    indexes are trusted as they are; the one fence is the wake-up handshake's."""

    ordering = Ordering.TSO

    def __init__(self, mm: mmap.mmap, capacity: int, data_fd: int, space_fd: int) -> None:
        super().__init__(mm, capacity, data_fd, space_fd)
        self._trusted = self._hdr64
        self._wake_flags = ((self._hdr32, _READER_WAITING),)
        self._drained_fds, self._counted_fds = (data_fd,), ()

    # -- writer

    def _publish(self, tail: int) -> None:
        self._hdr64[_TAIL] = tail
        _fence()
        if self._hdr32[_READER_WAITING]:
            # One signal a sleep: the flag is lowered with it, so the frames
            # published before the reader is up make no more system calls.
            # The reader raises it again before it next sleeps (K).
            self._hdr32[_READER_WAITING] = 0
            os.eventfd_write(self.data_fd, 1)

    def _wait_space(self, size: int, deadline: float | None) -> bool:
        hdr = self._hdr64
        room = self._usable - size

        def has_space() -> bool:
            return hdr[_TAIL] - hdr[_HEAD] <= room

        flags = [(self._hdr32, _WRITER_WAITING)]
        return self._space_waiter.wait(has_space, flags, [self.space_fd], deadline)

    # -- reader

    def readable(self) -> bool:
        return self._hdr64[_TAIL] != self._hdr64[_HEAD]

    def arm(self) -> None:
        self._hdr32[_READER_WAITING] = 1
        _fence()

    def disarm(self) -> None:
        self._hdr32[_READER_WAITING] = 0
        _take_count(self.data_fd)

    def _visible_tail(self) -> int:
        return self._hdr64[_TAIL]

    def _free(self, head: int) -> None:
        self._hdr64[_HEAD] = head
        _fence()
        if self._hdr32[_WRITER_WAITING]:
            os.eventfd_write(self.space_fd, 1)


class KernelOrderedRing(Ring):
    """A ring for CPUs that reorder memory accesses: KERNEL in the module's
    ordering contract.

    Each index a side trusts is one it counted through an eventfd: the
    writer adds every publication's bytes to ``data_fd``, the reader every
    batch's freed bytes to ``space_fd``. The shared ``head`` and ``tail``
    are stored too, but only as hints that a count is worth a system call.
    """

    ordering = Ordering.KERNEL

    def __init__(self, mm: mmap.mmap, capacity: int, data_fd: int, space_fd: int) -> None:
        super().__init__(mm, capacity, data_fd, space_fd)
        # Header-shaped, so both classes index it alike: the writer counts
        # the reader's head in it, the reader the writer's tail.
        self._trusted = array("Q", bytes(HEADER_SIZE))
        self._wake_flags, self._drained_fds, self._counted_fds = (), (), (data_fd,)

    # -- writer

    def _publish(self, tail: int) -> None:
        """Count the new records into ``data_fd``, which also wakes a sleeping reader."""
        hdr = self._hdr64
        published = tail - hdr[_TAIL]
        if published:
            hdr[_TAIL] = tail  # the hint first: a reader the count wakes finds it
            os.eventfd_write(self.data_fd, published)

    def _wait_space(self, size: int, deadline: float | None) -> bool:
        hdr, trusted = self._hdr64, self._trusted
        room = self._usable - size

        def has_space() -> bool:
            if hdr[_HEAD] != trusted[_HEAD]:  # the reader has freed more than counted
                trusted[_HEAD] += _take_count(self.space_fd)
            return hdr[_TAIL] - trusted[_HEAD] <= room

        counted = (self.space_fd,)
        return self._space_waiter.wait(has_space, (), (), deadline, counted_fds=counted)

    # -- reader

    def readable(self) -> bool:
        return self._visible_tail() != self._hdr64[_HEAD]

    def arm(self) -> None:
        """Nothing to ask: the writer counts every publication into :attr:`data_fd`."""

    def disarm(self) -> None:
        """Nothing to drop: :attr:`data_fd`'s count is the reader's to collect."""

    def _visible_tail(self) -> int:
        trusted = self._trusted
        if self._hdr64[_TAIL] != trusted[_TAIL]:  # the writer has published more than counted
            trusted[_TAIL] += _take_count(self.data_fd)
        return trusted[_TAIL]

    def _free(self, head: int) -> None:
        hdr = self._hdr64
        freed = head - hdr[_HEAD]
        hdr[_HEAD] = head  # the hint first, as in _publish
        os.eventfd_write(self.space_fd, freed)


def _ring_class(ordering: Ordering) -> type[Ring]:
    return KernelOrderedRing if ordering is Ordering.KERNEL else TsoRing


def _create_segment(capacity: int, prefix: str) -> tuple[mmap.mmap, int]:
    """A new shared-memory segment for a ring, mapped, and its descriptor.

    The name exists only between ``O_CREAT`` and ``unlink`` a few lines
    later, so not even a ``kill -9`` of the creator can leave it behind in
    /dev/shm, except inside that window (see :func:`remove_stale_segments`).
    """
    if capacity % 8 or not 64 <= capacity <= _MAX_CAPACITY:
        raise ValueError(f"capacity must be a multiple of 8 in [64, 2**31], got {capacity}")
    if "/" in prefix or not prefix:
        raise ValueError(f"bad segment prefix {prefix!r}")
    path = os.path.join(SHM_DIR, f"{prefix}-{os.getpid()}-{secrets.token_hex(8)}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        # Already gone if systemd's RemoveIPC= swept the user's /dev/shm in
        # between, as another unit of the same user stopped: no matter.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.ftruncate(fd, HEADER_SIZE + capacity)
        return mmap.mmap(fd, HEADER_SIZE + capacity, mmap.MAP_SHARED), fd
    except BaseException:
        os.close(fd)
        raise


def _map_segment(segment: int, capacity: int) -> tuple[mmap.mmap, Ordering]:
    """Map a ring's segment (Ring.attach), closing its descriptor; and the
    ordering its creator recorded."""
    try:
        mm = mmap.mmap(segment, HEADER_SIZE + capacity, mmap.MAP_SHARED)
    finally:
        os.close(segment)
    code = memoryview(mm)[:HEADER_SIZE].cast("I")[_ORDERING]
    return mm, next(o for o, c in _ORDERING_CODES.items() if c == code)


#: The spin budget of wait_readable().  One per process, because the call is
#: meant for the single thread that collects from all workers.
_collector = _Waiter()


def wait_readable(
    rings: Sequence[Ring], timeout: float | None, wake_fds: Sequence[int] = (), spin: bool = True
) -> list[Ring]:
    """Block until at least one ring has data; return those that do.

    Lets one thread serve many workers with the same spin-then-sleep logic as
    :meth:`Ring.get`.  Returns an empty list on timeout, or early when one of
    ``wake_fds`` (a signal wake-up pipe, say) becomes readable; the caller
    reads those itself. ``spin=False`` sleeps at once (the supervisor's loop
    passes it under load: irishost.supervisor.batch_waiter.BatchWaiter).
    """
    if not rings and not wake_fds:
        raise ValueError("wait_readable() needs a ring or a wake fd")
    readable = [ring for ring in rings if ring.readable()]
    if readable:  # a busy loop's usual case: no spin, and no poll set to build
        return readable

    def any_readable() -> bool:
        return any(ring.readable() for ring in rings)

    flags = [flag for ring in rings for flag in ring._wake_flags]
    fds = [fd for ring in rings for fd in ring._drained_fds]
    counted = [fd for ring in rings for fd in ring._counted_fds]
    _collector.wait(
        any_readable, flags, fds, _deadline(timeout), wake_fds, spin, counted_fds=counted
    )
    return [ring for ring in rings if ring.readable()]


def segment_prefix(cluster: str) -> str:
    """The /dev/shm name prefix of the rings of a host serving ``cluster``.

    A cluster name may be any non-empty string ("billing/v2", hundreds of
    characters), but a segment name is a single path component of at most
    NAME_MAX (255) bytes. So the prefix keeps only a short, filename-safe
    rendering of the name, for an operator reading /dev/shm, and adds a hash
    of the whole name, so that two clusters never share a prefix and one
    host's stale-segment sweep never touches another's.
    """
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", cluster)[:32]
    digest = hashlib.sha256(cluster.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"irishost-{readable}-{digest}"


def remove_stale_segments(prefix: str = "irishost") -> list[str]:
    """Delete segments that a killed creator left in /dev/shm.

    :meth:`Ring.create` unlinks its segment at once, so a leftover can only
    come from a creator killed inside that short window.  A segment is stale
    when its creator's pid is gone, or was reused by a process started after
    the segment was made.  Returns the names removed.
    """
    pattern = re.compile(re.escape(prefix) + r"-(\d+)-[0-9a-f]+")
    uid = os.getuid()
    removed = []
    for name in os.listdir(SHM_DIR):
        match = pattern.fullmatch(name)
        if not match:
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            st = os.stat(path)
            if st.st_uid != uid or _creator_alive(int(match.group(1)), st.st_mtime):
                continue
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed


def _creator_alive(pid: int, segment_mtime: float) -> bool:
    try:
        return psutil.Process(pid).create_time() <= segment_mtime + 1.0
    except psutil.NoSuchProcess:
        return False
