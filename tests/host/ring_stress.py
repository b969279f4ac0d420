"""A stress run of one ring between two processes, for tests/host/test_ring_order.py,
and the ring disciplines the ring tests run under here.

The writer (a forked child) sends numbered records; the reader (the caller)
rebuilds each record from its number and compares every byte. A record is
its sequence number, a body whose length and bytes follow from the number,
and a CRC-32 of body and number, so a record read before its bytes arrived (a
reordering of the stores that publish it), read half old and half new (torn)
or out of order never compares equal, and the message says which.

Bodies have odd lengths up to 300 bytes, so records start at every 8-byte
offset and straddle the end of the data area, in a ring small enough that
the writer laps it every few dozen records: a stale byte is always the byte
of another record. Every BIG_EVERY-th record is larger than half the ring,
so fragmented frames are in the mix; the writer alternates put and
put_batch.

``python tests/host/ring_stress.py [COUNT]`` runs it once with the ring
this interpreter chooses, for an interpreter that cannot run the suite: an
aarch64 Python under qemu-user (BENCHMARKS.md says how).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import random
import struct
import sys
import time
import zlib
from collections.abc import Iterator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from irishost.wire.ordering import Ordering, ordering_for  # noqa: E402
from irishost.wire.ring import Ring  # noqa: E402

#: The disciplines sound on this machine: KERNEL everywhere, TSO where the
#: machine's name says so. A TSO ring is not tested where it may fail for
#: the very reason it is not used there.
SOUND_HERE = [
    ordering
    for ordering in Ordering
    if ordering is Ordering.KERNEL
    or ordering_for(platform.machine(), struct.calcsize("P") * 8) is ordering
]

CAPACITY = 16 * 1024
BIG_EVERY = 5_000
BATCH = 32
TIMEOUT = 30.0

_BODIES = [random.Random(n).randbytes(n * 37 % 301) for n in range(97)]
_BIG = random.Random(-1).randbytes(CAPACITY + 1234)
# Each body with its CRC, so a record costs the CRC of its 8-byte number only.
_BODY_CRCS = [(body, zlib.crc32(body)) for body in _BODIES]
_BIG_CRC = (_BIG, zlib.crc32(_BIG))
_SEQ = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def record(seq: int) -> bytes:
    """Record ``seq``: its number, its body, and the CRC-32 of body and number."""
    head = _SEQ.pack(seq)
    body, crc = _BIG_CRC if seq % BIG_EVERY == BIG_EVERY - 1 else _BODY_CRCS[seq % len(_BODIES)]
    return head + body + _CRC.pack(zlib.crc32(head, crc))


def write_records(ring: Ring, count: int) -> None:
    """The writer's side: ``count`` records, in batches put one by one or together."""
    for start in range(0, count, BATCH):
        batch = [record(seq) for seq in range(start, min(start + BATCH, count))]
        if start // BATCH % 2:
            sent = ring.put_batch(batch, TIMEOUT)
            if sent != len(batch):
                raise TimeoutError(f"put_batch sent {sent} of {len(batch)}")
        else:
            for frame in batch:
                ring.put(frame, TIMEOUT)


@contextlib.contextmanager
def writer_process(ring: Ring, count: int) -> Iterator[multiprocessing.Process]:
    """:func:`write_records` in a forked child for the length of the block,
    which is killed if it is still running at the end."""
    child = multiprocessing.get_context("fork").Process(
        target=write_records, args=(ring, count), daemon=True
    )
    child.start()
    try:
        yield child
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)


def read_records(ring: Ring, count: int) -> str | None:
    """The reader's side: None when all ``count`` records arrived intact and in
    order, else what was wrong with the first that did not."""
    seq = 0
    while seq < count:
        for frame in ring.drain() or [ring.get(TIMEOUT)]:
            if frame is None:
                return f"record {seq}: nothing arrived within {TIMEOUT} s"
            expected = record(seq)
            if frame != expected:
                return _describe(seq, frame, expected)
            seq += 1
    return None


def _describe(seq: int, frame: bytes, expected: bytes) -> str:
    got_seq = _SEQ.unpack_from(frame)[0] if len(frame) >= _SEQ.size else None
    if got_seq != seq:
        return f"record {seq}: got record {got_seq} (out of order, lost or torn at the start)"
    first = next(
        (i for i, (a, b) in enumerate(zip(frame, expected, strict=False)) if a != b),
        min(len(frame), len(expected)),
    )
    return (
        f"record {seq}: torn or stale at byte {first} of {len(expected)} (got {len(frame)} bytes)"
    )


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    ring = Ring.create(CAPACITY, prefix=f"ringstress-{os.getpid()}")
    print(f"{platform.machine()}, {struct.calcsize('P') * 8}-bit: {type(ring).__name__}")
    started = time.perf_counter()
    try:
        with writer_process(ring, count) as writer:
            problem = read_records(ring, count)
            writer.join(TIMEOUT)
    finally:
        ring.close()
    seconds = time.perf_counter() - started
    print(f"{count:,} records in {seconds:.1f} s: {problem or 'all whole and in order'}")
    return 1 if problem or writer.exitcode else 0


if __name__ == "__main__":
    sys.exit(main())
