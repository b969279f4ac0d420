"""The write-combining socket writer, over a real socket pair.

Every sender's packets must arrive whole and in its order however the
writer batches them, a sender must not race ahead of a peer that stops
reading (the outbox is bounded), and a broken socket must fail senders.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from iris import ClosedError, TimeoutError
from iris.send_buffer import DEFAULT_SEND_BUFFER
from iris.writer import OUTBOX_PACKETS, SMALL_PACKET, SocketWriter

# How long a check that something stays blocked waits before concluding it does.
BLOCKED_FOR = 0.5


def frame(sender: int, seq: int, size: int) -> bytes:
    """A self-describing packet: length, sender, sequence number, filler."""
    body = sender.to_bytes(2, "little") + seq.to_bytes(4, "little") + bytes(size)
    return len(body).to_bytes(4, "little") + body


def read_frames(sock: socket.socket, total: int) -> list[tuple[int, int, int]]:
    """(sender, seq, filler size) of ``total`` frames read from ``sock``."""
    buf, frames = bytearray(), []
    while len(frames) < total:
        data = sock.recv(1 << 20)
        assert data, "the writer's side closed early"
        buf += data
        while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "little"):
            size = int.from_bytes(buf[:4], "little")
            body = bytes(buf[4 : 4 + size])
            del buf[: 4 + size]
            frames.append(
                (int.from_bytes(body[:2], "little"), int.from_bytes(body[2:6], "little"), size - 6)
            )
    return frames


def test_concurrent_senders_arrive_whole_and_in_order(socket_pair):
    left, right = socket_pair
    writer = SocketWriter(left, DEFAULT_SEND_BUFFER)
    senders, count = 16, 400
    # Mostly small packets, every 50th one larger than SMALL_PACKET.
    sizes = [SMALL_PACKET + 10 if seq % 50 == 49 else seq % 300 for seq in range(count)]

    def send_all(sender: int) -> None:
        for seq in range(count):
            writer.send(frame(sender, seq, sizes[seq]))

    threads = [threading.Thread(target=send_all, args=(s,)) for s in range(senders)]
    received: list = []
    reader = threading.Thread(target=lambda: received.extend(read_frames(right, senders * count)))
    reader.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    reader.join(30)

    assert len(received) == senders * count
    for sender in range(senders):
        mine = [(seq, size) for who, seq, size in received if who == sender]
        assert mine == [(seq, sizes[seq]) for seq in range(count)]


def test_a_sender_waits_when_the_peer_stops_reading(socket_pair):
    """With the writer stuck on a full socket, other senders queue at most
    OUTBOX_PACKETS packets and then wait, instead of buffering without bound."""
    left, right = socket_pair
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = SocketWriter(left, DEFAULT_SEND_BUFFER)
    big = frame(0, 0, 4 << 20)  # far more than the socket buffers hold: its sender blocks
    many = 1000  # appending them takes a few ms when nothing bounds the outbox
    assert many > 2 * OUTBOX_PACKETS
    blocked_writer = threading.Thread(target=writer.send, args=(big,))
    blocked_writer.start()
    time.sleep(0.1)
    small_sender = threading.Thread(
        target=lambda: [writer.send(frame(1, seq, 10)) for seq in range(many)]
    )
    small_sender.start()
    small_sender.join(BLOCKED_FOR)
    assert small_sender.is_alive(), "sender queued without bound while the peer did not read"

    received = read_frames(right, 1 + many)
    blocked_writer.join(10)
    small_sender.join(10)
    assert received[0] == (0, 0, 4 << 20)
    assert [seq for _, seq, _ in received[1:]] == list(range(many))


def test_a_broken_socket_fails_the_sender_and_every_later_one(socket_pair):
    left, right = socket_pair
    writer = SocketWriter(left, DEFAULT_SEND_BUFFER)
    right.close()
    with pytest.raises(ClosedError, match="connection lost"):
        for _ in range(100):  # the first writes may still land in the buffer
            writer.send(frame(0, 0, 100_000))
    with pytest.raises(ClosedError, match="connection lost"):
        writer.send(frame(0, 1, 1))


class BreaksMidWrite:
    """A real socket whose first ``sendall`` fails after another sender has
    queued a packet meanwhile: the peer went away in the middle of a batch.

    The race cannot be scheduled on a real socket alone, so this wrapper
    makes the second sender's append happen inside the failing write.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.writer: SocketWriter | None = None

    def sendall(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.hold(b"queued during the failing write", OUTBOX_PACKETS)
        self.sock.close()
        raise BrokenPipeError(32, "Broken pipe")


def test_a_write_failing_with_packets_queued_ends_the_flush(socket_pair):
    """A failed write must not leave the writer looping over packets it can no
    longer send (it used to spin at 100 % CPU, holding up every caller)."""
    broken = BreaksMidWrite(socket_pair[0])
    writer = SocketWriter(broken, DEFAULT_SEND_BUFFER)  # a socket, as far as it knows
    broken.writer = writer
    assert writer.hold(b"first", OUTBOX_PACKETS)

    flushing = threading.Thread(target=writer.flush, daemon=True)
    flushing.start()
    flushing.join(2.0)

    assert not flushing.is_alive(), "flush kept looping after the write failed"
    with pytest.raises(ClosedError, match="Broken pipe"):
        writer.send(b"later")


def test_over_the_bound_callers_wait_for_room_until_their_deadline(socket_pair):
    """The bytes left in the outbox are counted: over the bound, wait_for_room
    blocks, raises TimeoutError at a deadline, and returns once the peer has
    read enough."""
    left, right = socket_pair
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    bound = 64 * 1024
    writer = SocketWriter(left, bound)
    writer.wait_for_room(time.monotonic())  # nothing queued: no wait, even at the deadline
    # Larger than the bound, both: the first is written by its sender (stuck
    # on the full socket), the second waits in the outbox, over the bound.
    big = [frame(0, 0, 4 << 20), frame(0, 1, 1 << 20)]
    senders = [threading.Thread(target=writer.send, args=(packet,)) for packet in big]
    for sender in senders:
        sender.start()
        time.sleep(0.1)

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="room to send"):
        writer.wait_for_room(started + 0.2)
    assert 0.2 <= time.monotonic() - started < BLOCKED_FOR

    waiting = threading.Thread(target=writer.wait_for_room)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive(), "a caller went on with the queue over its bound"
    received = read_frames(right, 2)  # the peer reads: room returns
    waiting.join(10)
    for sender in senders:
        sender.join(10)
    assert not waiting.is_alive() and received == [(0, 0, 4 << 20), (0, 1, 1 << 20)]


def test_a_caller_waiting_for_room_gets_closed_error_when_the_socket_breaks(socket_pair):
    left, right = socket_pair
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = SocketWriter(left, 1)
    errors: list[BaseException] = []

    def run(call, *args) -> None:
        try:
            call(*args)
        except ClosedError as err:
            errors.append(err)

    threads = [
        threading.Thread(target=run, args=(writer.send, frame(0, 0, 4 << 20))),
        threading.Thread(target=run, args=(writer.send, frame(0, 1, 100))),  # queued: over 1
        threading.Thread(target=run, args=(writer.wait_for_room,)),
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    assert threads[2].is_alive(), "no wait for room over the bound"
    right.close()
    left.shutdown(socket.SHUT_RDWR)
    for thread in threads:
        thread.join(10)
    # The writer's sender and the waiter; the queued packet's sender had returned.
    assert not any(thread.is_alive() for thread in threads) and len(errors) == 2
