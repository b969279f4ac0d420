"""The relay's bounds on what peers make it hold, checked on a real relay process.

- A connection that has not completed INIT by the handshake deadline is closed.
- A packet still incomplete at the packet deadline (counted from its first
  byte) closes its connection, whether it stalled or trickles; a healthy
  stream whose reads split packets is never taken for one.
- The bytes of partial packets of all connections stay under a budget; past
  it, the connection with the oldest partial packet is closed, the rest served.
- Out of file descriptors, the relay pauses accepting instead of spinning on
  accept, logs it once, keeps serving its connections, and accepts again
  once descriptors are free.

Deadlines are set short on the command line so the tests take a second each.
"""

from __future__ import annotations

import threading
import time

import psutil
from support import cpu_share, wait_for

from iris.codec import Closed, Init, Publish, Subscribe

MiB = 1 << 20
# How late a deadline may be met on a loaded two-core machine (the tick is a
# quarter of the deadline).
LATE = 1.5


def closed_with(peer, reason: str) -> None:
    """The relay sends ``peer`` a CLOSE whose reason contains ``reason``, then hangs up."""
    packets = peer.expect_eof(timeout=5)
    assert [type(packet) for packet in packets] == [Closed], packets
    assert reason in packets[0].reason, packets[0].reason


def echoing(peer, topic: str = "alive"):
    """``peer`` (attached) subscribes to ``topic``; returns a round-trip check."""
    peer.send(Subscribe(topic))

    def round_trip() -> None:
        peer.send(Publish(topic, b"still served"))
        assert peer.recv() == Publish(topic, b"still served")

    round_trip()
    return round_trip


def test_no_handshake_by_the_deadline_closes_the_connection(relay_factory, raw):
    relay = relay_factory("--handshake-timeout", "0.3")
    started = time.monotonic()
    silent = raw(relay.port)
    half = raw(relay.port)
    half.send_bytes(Init().encode()[:5])
    attached = raw(relay.port).handshake()
    round_trip = echoing(attached)

    closed_with(silent, "no handshake within 0.3 s")
    closed_with(half, "no handshake within 0.3 s")
    assert time.monotonic() - started < 0.3 + LATE
    time.sleep(0.5)  # well past the deadline: an attached connection stays
    round_trip()
    assert relay.log().count("no handshake within") == 2


def test_a_stalled_packet_closes_its_connection(relay_factory, raw):
    relay = relay_factory("--packet-timeout", "0.3")
    bystander = raw(relay.port).handshake()
    round_trip = echoing(bystander)
    stalled = raw(relay.port).handshake()
    wire = Publish("alive", bytes(1000)).encode()
    started = time.monotonic()
    stalled.send_bytes(wire[:500])
    closed_with(stalled, "packet not completed within 0.3 s")
    assert time.monotonic() - started < 0.3 + LATE
    round_trip()


def test_a_trickled_packet_is_closed_at_its_deadline(relay_factory, raw):
    """Bytes keep coming, but the packet they belong to is never finished:
    the deadline counts from the packet's first byte, not the last read."""
    relay = relay_factory("--packet-timeout", "0.3")
    trickler = raw(relay.port).handshake()
    wire = Publish("t", bytes(1000)).encode()
    stop = threading.Event()

    def trickle() -> None:
        for i in range(len(wire) - 1):
            if stop.wait(0.02):
                return
            try:
                trickler.send_bytes(wire[i : i + 1])
            except OSError:  # the relay hung up
                return

    thread = threading.Thread(target=trickle)
    thread.start()
    started = time.monotonic()
    try:
        closed_with(trickler, "packet not completed within 0.3 s")
        assert time.monotonic() - started < 0.3 + LATE
    finally:
        stop.set()
        thread.join()


def test_a_stream_of_split_packets_outlives_the_packet_deadline(relay_factory, raw):
    """For a second, every write ends inside a packet that the next write
    completes: a packet is always partial, none for long. Nothing is closed."""
    relay = relay_factory("--packet-timeout", "0.3")
    streamer = raw(relay.port).handshake()
    streamer.send(Subscribe("s"))
    events = [bytes([i]) * 100 for i in range(40)]
    wire = b"".join(Publish("s", event).encode() for event in events)
    piece = len(wire) // 25 + 1  # about 1.6 packets: every piece ends mid-packet
    for start in range(0, len(wire), piece):
        streamer.send_bytes(wire[start : start + piece])
        time.sleep(0.04)
    assert [streamer.recv() for _ in events] == [Publish("s", event) for event in events]
    assert "packet not completed" not in relay.log()


def test_partial_packets_over_the_budget_close_the_oldest(relay_factory, raw):
    """Four peers each announce a 1 MiB publish and send 900 KiB of it; with a
    budget of 3 MiB the fourth one's bytes push the total over, and the peer
    whose partial packet is oldest is closed. The others carry on."""
    relay = relay_factory("--max-message", "1MiB", "--partial-budget", "3MiB")
    bystander = raw(relay.port).handshake()
    round_trip = echoing(bystander)
    bystander.send(Subscribe("big"))
    head = Publish("big", bytes(MiB)).encode()[: -MiB + 900 * 1024]
    hoarders = []
    for _ in range(4):
        hoarder = raw(relay.port).handshake()
        hoarder.send_bytes(head)
        hoarders.append(hoarder)
        time.sleep(0.3)  # the relay has read it all: the hoarders are in age order
    oldest, *others = hoarders
    closed_with(oldest, "exceed the relay's budget of 3145728 bytes")
    for hoarder in others:
        hoarder.assert_silent()
    round_trip()
    # A partial packet that goes on to complete is delivered.
    last = others[-1]
    last.send_bytes(Publish("big", bytes(MiB)).encode()[len(head) :])
    assert bystander.recv(10) == Publish("big", bytes(MiB))
    assert relay.log().count("exceed the relay's budget") == 1


def cpu_and_log_lines(relay, seconds: float) -> tuple[float, int]:
    """The share of a core the relay uses over ``seconds``, and the lines it logs."""
    lines = relay.log().count("\n")
    busy = cpu_share(relay.proc.pid, seconds)
    return busy, relay.log().count("\n") - lines


def test_out_of_file_descriptors_the_relay_pauses_accepting(relay, raw):
    bystander = raw(relay.port).handshake()
    round_trip = echoing(bystander)
    process = psutil.Process(relay.proc.pid)
    spare = 4
    limit = process.num_fds() + spare
    process.rlimit(psutil.RLIMIT_NOFILE, (limit, limit))
    crowd = [raw(relay.port) for _ in range(3 * spare)]  # the rest wait in the backlog
    wait_for(lambda: "Too many open files" in relay.log())

    busy, lines = cpu_and_log_lines(relay, 1.0)
    assert busy < 0.2, f"relay used {busy:.0%} of a core while out of descriptors"
    assert lines <= 1, relay.log()[-2000:]
    round_trip()  # connections already accepted are served meanwhile

    for peer in crowd:
        peer.close()
    late = raw(relay.port).handshake()  # accepted again
    echoing(late, "late")
    wait_for(lambda: "accepting connections again" in relay.log())
    assert relay.log().count("cannot accept connections") == 1
