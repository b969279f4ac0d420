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
- Peers that stop reading are cut: the four services of issue 18 that never
  read leave the relay's RSS under 600 MiB and are dropped within the write
  deadline; over the outbound budget, the largest backlog is cut first while
  the rest are served; a peer that takes nothing for the write deadline is
  cut, one that takes a little now and then is not.

Deadlines are set short on the command line so the tests take a second each.
"""

from __future__ import annotations

import select
import threading
import time

import psutil
from support import cpu_share, wait_for
from test_relay import stuck_subscriber

from iris.codec import Closed, Init, Publish, RequestPacket, Subscribe
from iris.relay.status import query
from iris.tool.status import show

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


def relay_name(peer) -> str:
    """How the relay names ``peer`` in its log: the address it sees."""
    host, port = peer.sock.getsockname()[:2]
    return f"{host}:{port}"


def cut_for(relay, cause: str) -> int:
    """How many slow consumers the relay has cut for ``cause``."""
    return query(relay.port)["slow_consumer_causes"][cause]


def drain_in_background(peer, stop: threading.Event) -> threading.Thread:
    """Read and discard whatever ``peer`` is sent until ``stop``: a well-behaved reader."""

    def drain() -> None:
        # select, not a socket timeout: a timeout would apply to the sends of
        # the test's own thread on the same socket too, and end its flood early.
        while not stop.is_set():
            if not select.select([peer.sock], [], [], 0.1)[0]:
                continue
            try:
                if not peer.sock.recv(1 << 20):
                    return
            except OSError:
                return

    thread = threading.Thread(target=drain)
    thread.start()
    return thread


def test_four_services_that_never_read_cannot_grow_the_relay(relay_factory, raw):
    """Issue 18's measure: four services that register and never read, sent
    1 MiB requests as fast as a client can, took the relay to 1,045 MiB. Now
    its RSS stays under 600 MiB, and each is dropped within the write deadline,
    or sooner by the outbound budget or the last one's cap (both 256 MiB),
    while the relay serves the rest."""
    relay = relay_factory("--write-deadline", "2")
    process = psutil.Process(relay.proc.pid)
    bystander = raw(relay.port).handshake()
    round_trip = echoing(bystander)
    stalled = [raw(relay.port).handshake("stalled") for _ in range(4)]
    flooder = raw(relay.port).handshake()
    flooder.sock.settimeout(None)  # the handshake's read left one; the flood must only end on stop
    stop = threading.Event()
    reader = drain_in_background(flooder, stop)  # answers to the requests of cut members
    payload = bytes(MiB)

    def flood() -> None:
        ident = 0
        while not stop.is_set():
            ident += 1
            try:
                flooder.send(RequestPacket(ident, "stalled", payload, 600_000))
            except OSError:
                return

    flooding = threading.Thread(target=flood)
    peak = 0

    def all_cut() -> bool:
        nonlocal peak
        peak = max(peak, process.memory_info().rss)
        return query(relay.port)["slow_consumers"] == len(stalled)  # for whichever bound

    started = time.monotonic()
    flooding.start()
    try:
        try:
            wait_for(all_cut, timeout=30, what="the four stalled services cut")
        except AssertionError as error:
            raise AssertionError(
                f"{error}; status {query(relay.port)}; log: {relay.log()[-3000:]}"
            ) from None
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        flooding.join()
        reader.join()
    assert peak < 600 * MiB, f"relay RSS reached {peak / MiB:.0f} MiB"
    assert elapsed < 2 + LATE, f"the stalled services were cut after {elapsed:.1f} s"
    log = relay.log()
    for peer in stalled:
        assert f"closing {relay_name(peer)}: peer stopped reading" in log, log[-3000:]
    assert log.count("peer stopped reading") == len(stalled)
    round_trip()


def publish_until(publisher, relay, topic: str, done) -> int:
    """Publish 64 KiB events to ``topic`` until ``done(snapshot)``; return how many."""
    event, published = Publish(topic, bytes(64 * 1024)), 0
    while not done(query(relay.port)):
        publisher.send(event)
        published += 1
        assert published < 1000, f"{topic}: the relay never got there"
    return published


def test_over_the_outbound_budget_the_largest_backlog_is_cut_first(relay_factory, raw):
    """Two subscribers stop reading, one holding about 5 MiB, the other about
    2; more for the smaller one takes the total past the 8 MiB budget, and
    the larger is cut. The smaller keeps everything, and a reader is served."""
    relay = relay_factory("--outbound-budget", "8MiB")
    bystander = raw(relay.port).handshake()
    round_trip = echoing(bystander)
    big = stuck_subscriber(raw, relay.port, "big")
    small = stuck_subscriber(raw, relay.port, "small")
    publisher = raw(relay.port).handshake()
    publish_until(publisher, relay, "big", lambda status: status["unsent_bytes"] >= 5 * MiB)
    to_small = publish_until(
        publisher, relay, "small", lambda status: status["unsent_bytes"] >= 7 * MiB
    )
    round_trip()  # backed-up peers cost a reader nothing
    to_small += publish_until(
        publisher, relay, "small", lambda status: status["slow_consumers"] == 1
    )
    assert cut_for(relay, "outbound_budget") == 1
    cut = f"closing {relay_name(big)}: peer stopped reading: unsent bytes of all"
    # Counted (above) a moment before the line is written, on a loaded machine.
    log = wait_for(lambda: cut in (text := relay.log()) and text, what="the cut logged")
    assert f"closing {relay_name(small)}" not in log
    round_trip()
    # The smaller one, reading at last, gets every event it was sent.
    assert [small.recv().topic for _ in range(to_small)] == ["small"] * to_small
    small.assert_silent()


def test_a_peer_that_takes_nothing_is_cut_at_the_write_deadline(relay_factory, raw, capsys):
    """Two subscribers fall 2 MiB behind; one reads nothing, the other 16 KiB
    every 0.2 s, far slower than it is sent to. Only the first is cut, at the
    deadline; the other is still served two deadlines on, and gets everything."""
    relay = relay_factory("--write-deadline", "1")
    stuck = stuck_subscriber(raw, relay.port, "flood")
    slow = stuck_subscriber(raw, relay.port, "flood")
    publisher = raw(relay.port).handshake()
    stop = threading.Event()

    def read_a_little() -> None:
        while not stop.wait(0.2):
            slow.pending.extend(slow.decoder.feed(slow.sock.recv(16 * 1024)))

    started = time.monotonic()
    published = publish_until(
        publisher, relay, "flood", lambda status: status["unsent_bytes"] >= 4 * MiB
    )
    trickle = threading.Thread(target=read_a_little)
    trickle.start()
    try:
        wait_for(lambda: cut_for(relay, "write_deadline") == 1, what="the stuck peer cut")
        assert time.monotonic() - started < 1 + LATE
        time.sleep(2.0)  # two deadlines more: the slow reader is not taken for a stalled one
        status = query(relay.port)
        assert status["slow_consumers"] == 1 and status["unsent_bytes"] > 0
    finally:
        stop.set()
        trickle.join()
    assert f"closing {relay_name(stuck)}: peer stopped reading: nothing taken for 1 s" in (
        relay.log()
    )
    assert [slow.recv().topic for _ in range(published)] == ["flood"] * published
    show(relay.port, as_json=False)  # iris relay status
    shown = capsys.readouterr().out
    assert "slow:        1 consumers dropped for not reading (1 write_deadline)" in shown
