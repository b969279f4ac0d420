"""The relay as a whole: through the binding, and through raw sockets that
speak bytes built with iris.codec (see conftest.RawPeer)."""

from __future__ import annotations

import collections
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from bystander import Bystander
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raw_tunnel import CHUNK, RELAY_BUFFER, MiB, open_raw_tunnel
from support import OneShotServer, cpu_share, echo_tunnel, in_threads, timed, wait_for

import iris
from iris import codec
from iris.codec import (
    BroadcastDelivery,
    BroadcastPacket,
    Close,
    Closed,
    Deny,
    Init,
    Publish,
    ReplyDelivery,
    ReplyPacket,
    RequestDelivery,
    RequestPacket,
    Subscribe,
    TunnelAllow,
    TunnelClose,
    TunnelClosed,
    TunnelConfirm,
    TunnelInit,
    TunnelOffer,
    TunnelResult,
    TunnelTransfer,
)
from iris.relay import RelayServer

LATE = 0.1  # how late a relay timer may fire on a loaded machine


class Echo(iris.ServiceHandler):
    def __init__(self, name: bytes = b""):
        self.name = name
        self.count = 0
        self.broadcasts: list[bytes] = []
        self._lock = threading.Lock()

    def handle_request(self, request: bytes) -> bytes:
        with self._lock:
            self.count += 1
        return self.name + request

    def handle_broadcast(self, message: bytes) -> None:
        self.broadcasts.append(message)

    def handle_tunnel(self, tunnel: iris.Tunnel) -> None:
        echo_tunnel(tunnel)


class Sleepy(Echo):
    def __init__(self, name: bytes, delay: float):
        super().__init__(name)
        self.delay = delay

    def handle_request(self, request: bytes) -> bytes:
        time.sleep(self.delay)
        return super().handle_request(request)


# ---------------------------------------------------------------------------
# Every scheme, several clients and members.


def test_every_scheme_with_several_clients_and_members(relay, attach):
    members = [Echo(b"m%d:" % i) for i in range(3)]
    for member in members:
        attach.register(relay.port, "svc", member)
    clients = [attach.connect(relay.port) for _ in range(3)]
    events: dict[int, list[bytes]] = collections.defaultdict(list)
    for n, client in enumerate(clients):
        client.subscribe("topic", lambda event, n=n: events[n].append(event))
        client.publish("topic", b"probe %d" % n)  # after the SUBSCRIBE on the same socket
        wait_for(lambda n=n: b"probe %d" % n in events[n])

    def use(n: int) -> None:
        client = clients[n]
        for i in range(10):
            reply = client.request("svc", b"c%d-%d" % (n, i), 5)
            assert reply.endswith(b"c%d-%d" % (n, i)) and reply[:3] in (b"m0:", b"m1:", b"m2:")
        client.broadcast("svc", b"from c%d" % n)
        client.publish("topic", b"event c%d" % n)
        with client.tunnel("svc", 1) as tunnel:
            for i in range(5):
                tunnel.send(b"t%d" % i)
                assert tunnel.recv(5) == b"t%d" % i

    in_threads(3, use)
    expected_broadcasts = sorted(b"from c%d" % n for n in range(3))
    wait_for(lambda: all(len(m.broadcasts) == 3 for m in members))
    for member in members:
        assert sorted(member.broadcasts) == expected_broadcasts
    published = sorted(b"event c%d" % k for k in range(3))
    for n in range(3):
        wait_for(lambda n=n: sorted(e for e in events[n] if e.startswith(b"event")) == published)
    assert sum(m.count for m in members) == 30


def test_raw_broadcast_and_publish(relay, raw):
    member_a = raw(relay.port).handshake("group")
    member_b = raw(relay.port).handshake("group")
    plain = raw(relay.port).handshake()
    plain.send(Subscribe("topic"), Publish("topic", b"probe"))
    assert plain.recv() == Publish("topic", b"probe")  # subscribed: the relay saw it
    member_a.send(Subscribe("topic"))
    # A member's own broadcast and a subscriber's own event come back to it.
    member_a.send(BroadcastPacket("group", b"hello"), Publish("topic", b"news"))
    for peer in (member_a, member_b):
        packet = peer.recv()
        assert type(packet) is BroadcastDelivery and packet.message == b"hello"
    assert member_a.recv() == Publish("topic", b"news")
    assert plain.recv() == Publish("topic", b"news")
    plain.send(BroadcastPacket("nobody", b"lost"), BroadcastPacket("group", b"again"))
    for peer in (member_a, member_b):
        assert peer.recv() == BroadcastDelivery(b"again")
    for peer in (member_a, member_b, plain):  # a plain client is a member of nothing
        peer.assert_silent(0.1)


def test_request_to_own_cluster(relay, attach):
    service = attach.register(relay.port, "self", Echo(b"me:"))
    assert service.conn.request("self", b"hi", 1) == b"me:hi"


# ---------------------------------------------------------------------------
# Load balancing.


def test_concurrent_requests_spread_fairly(relay, attach):
    members = [Sleepy(b"%d" % i, 0.005) for i in range(3)]
    for member in members:
        attach.register(relay.port, "lb", member)
    conn = attach.connect(relay.port)

    def worker(n: int) -> None:
        for _ in range(10):
            conn.request("lb", b"x", 5)

    in_threads(30, worker)
    counts = [m.count for m in members]
    assert sum(counts) == 300
    assert min(counts) >= 60, counts  # a fair share is 100


def test_sequential_requests_round_robin_among_idle_members(relay, attach):
    for i in range(3):
        attach.register(relay.port, "rr", Echo(b"%d" % i))
    conn = attach.connect(relay.port)
    order = [conn.request("rr", b"x", 1)[:1] for _ in range(30)]
    assert sorted(set(order)) == [b"0", b"1", b"2"]
    assert order == order[:3] * 10  # the same rotation, every member once per round


def test_busy_member_is_skipped(relay, raw, attach):
    """The least loaded member gets the request: one holding a request is passed over."""
    stuck = raw(relay.port).handshake("pick")
    client = raw(relay.port).handshake()
    client.send(RequestPacket(1, "pick", b"held", 5000))
    assert type(stuck.recv()) is RequestDelivery  # the only member: it holds one now
    live = Echo(b"live:")
    attach.register(relay.port, "pick", live)
    conn = attach.connect(relay.port)
    replies = [conn.request("pick", b"%d" % i, 2) for i in range(6)]
    assert replies == [b"live:%d" % i for i in range(6)]
    stuck.assert_silent(0.05)


# ---------------------------------------------------------------------------
# Timeouts.


def test_timeouts_fire_when_they_pass(relay, raw):
    client = raw(relay.port).handshake()
    timeouts = {1: 50, 2: 400, 3: 200, 4: 1}
    start = time.monotonic()
    client.send(*(RequestPacket(rid, "nobody", b"x", ms) for rid, ms in timeouts.items()))
    arrived = {}
    for _ in timeouts:
        packet = client.recv()
        arrived[packet.id] = time.monotonic() - start
        assert packet == ReplyDelivery(packet.id, True) and type(packet) is ReplyDelivery
    for rid, ms in timeouts.items():
        assert ms / 1000 - 0.005 <= arrived[rid] <= ms / 1000 + LATE, (rid, arrived)
    assert sorted(arrived, key=arrived.get) == [4, 1, 3, 2]


def test_member_gets_the_time_left(relay, raw):
    member = raw(relay.port).handshake("timed")
    client = raw(relay.port).handshake()
    client.send(RequestPacket(9, "timed", b"q", 1234))
    delivery = member.recv()
    assert type(delivery) is RequestDelivery
    assert delivery.request == b"q" and 1200 <= delivery.timeout_ms <= 1234


def test_reply_after_the_deadline_is_ignored(relay, raw):
    member = raw(relay.port).handshake("late")
    client = raw(relay.port).handshake()
    start = time.monotonic()
    client.send(RequestPacket(7, "late", b"q", 200))
    delivery = member.recv()
    assert client.recv() == ReplyDelivery(7, True)
    assert time.monotonic() - start >= 0.195
    member.send(
        ReplyPacket(delivery.id, True, b"too late"), ReplyPacket(123456, False, "unknown id")
    )
    client.assert_silent()
    # The late member was ignored, not dropped: it still serves.
    client.send(RequestPacket(8, "late", b"again", 2000))
    delivery = member.recv()
    member.send(ReplyPacket(delivery.id, True, b"in time"))
    reply = client.recv()
    assert reply == ReplyDelivery(8, False, True, b"in time") and type(reply) is ReplyDelivery


def test_reply_from_another_member_is_ignored(relay, raw):
    members = [raw(relay.port).handshake("pair") for _ in range(2)]
    client = raw(relay.port).handshake()
    client.send(RequestPacket(1, "pair", b"q", 2000))
    ready, _, _ = select.select([m.sock for m in members], [], [], 5)
    chosen, other = members if ready[0] is members[0].sock else members[::-1]
    delivery = chosen.recv()
    other.send(ReplyPacket(delivery.id, True, b"impostor"))
    client.assert_silent(0.1)
    chosen.send(ReplyPacket(delivery.id, False, "real fault"))
    assert client.recv() == ReplyDelivery(1, False, False, "real fault")
    other.assert_silent(0)  # the other member got nothing, and was not dropped


def _readable(peer) -> bool:
    return bool(peer.pending or select.select([peer.sock], [], [], 0)[0])


def test_member_leaving_mid_request_times_out_at_the_deadline(relay, raw, attach):
    member = raw(relay.port).handshake("leaver")
    conn = attach.connect(relay.port)
    outcome = []
    caller = threading.Thread(
        target=lambda: outcome.append(timed(conn.request, "leaver", b"x", 0.4))
    )
    caller.start()
    assert type(member.recv()) is RequestDelivery
    member.close()
    caller.join(5)
    err, took = outcome[0]
    assert isinstance(err, iris.TimeoutError)
    assert 0.39 <= took <= 0.4 + LATE


# ---------------------------------------------------------------------------
# Handshake and closing.


def test_version_mismatch_is_denied(relay, raw):
    peer = raw(relay.port)
    peer.send(Init("", "v0.9"))
    packets = peer.expect_eof()
    assert len(packets) == 1 and type(packets[0]) is Deny
    assert "v0.9" in packets[0].reason and "v1.0-draft2" in packets[0].reason


def test_binding_surfaces_the_relays_deny(relay, raw):
    """The relay's real DENY bytes, replayed to the binding by a loopback server."""
    peer = raw(relay.port)
    peer.send_bytes(Init("", "v0.9").encode())
    deny = b""
    while chunk := peer.sock.recv(4096):
        deny += chunk
    with OneShotServer(deny) as server:
        with pytest.raises(ConnectionRefusedError, match="denied") as info:
            iris.connect(server.port)
        assert "v0.9" in str(info.value) and "v1.0-draft2" in str(info.value)


def test_graceful_close(relay, raw):
    client = raw(relay.port).handshake("leaving")
    client.send(Close())
    assert client.expect_eof() == [Closed("")]


def test_close_stops_routing_to_a_member(relay, raw):
    member = raw(relay.port).handshake("gone")
    client = raw(relay.port).handshake()
    member.send(Close())
    assert member.expect_eof() == [Closed("")]
    client.send(RequestPacket(1, "gone", b"x", 100), BroadcastPacket("gone", b"x"))
    assert client.recv() == ReplyDelivery(1, True)


def test_sigterm_closes_every_connection(relay_factory, raw, attach):
    relay = relay_factory()
    peers = [raw(relay.port).handshake(), raw(relay.port).handshake("svc")]
    unattached = raw(relay.port)  # connected, never sent INIT
    conn = attach.connect(relay.port)
    relay.proc.send_signal(signal.SIGTERM)
    for peer in (*peers, unattached):
        assert peer.expect_eof() == [Closed("relay shutting down")]
    wait_for(lambda: conn.closed)
    with pytest.raises(iris.ClosedError):
        conn.request("svc", b"x", 1)
    assert relay.proc.wait(5) == 0
    assert "relay stopped" in relay.log()


def test_sigterm_reaches_readers_despite_a_stuck_peer(relay_factory, raw, attach):
    """A peer that does not read must not use up the others' shutdown grace."""
    relay = relay_factory()
    healthy = [raw(relay.port).handshake() for _ in range(4)]
    stuck_subscriber(raw, relay.port, "flood")  # in the middle of the relay's peer set
    healthy += [raw(relay.port).handshake() for _ in range(4)]
    publisher = attach.connect(relay.port)
    for _ in range(256):
        publisher.publish("flood", bytes(64 * 1024))
    time.sleep(0.2)  # the relay's output to the stuck peer is backed up
    start = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    for peer in healthy:
        assert peer.expect_eof() == [Closed("relay shutting down")]
    assert time.monotonic() - start < 0.5  # not after the stuck peer's grace second
    assert relay.proc.wait(5) == 0


# ---------------------------------------------------------------------------
# Tunnels on the wire.


def test_tunnel_packet_by_packet(relay, raw):
    """docs/protocol.md section 6, "A tunnel, packet by packet"."""
    a = raw(relay.port).handshake()
    b = raw(relay.port).handshake("echo")
    a.send(TunnelInit(0, "echo", 1000))
    offer = b.recv()
    assert type(offer) is TunnelOffer and offer.chunk_limit == CHUNK
    b.send(TunnelConfirm(offer.build_id, 5), TunnelAllow(5, 64 * MiB))
    assert b.recv() == TunnelAllow(5, RELAY_BUFFER)
    assert a.recv() == TunnelResult(0, False, CHUNK)
    assert a.recv() == TunnelAllow(0, RELAY_BUFFER)
    a.send(TunnelAllow(0, 64 * MiB), TunnelTransfer(0, 100, b"a" * 100))
    assert a.recv() == TunnelAllow(0, 100)  # the relay forwarded them
    assert b.recv() == TunnelTransfer(5, 100, b"a" * 100)
    b.send(TunnelAllow(5, 100), TunnelTransfer(5, 100, b"b" * 100))
    assert b.recv() == TunnelAllow(5, 100)
    assert a.recv() == TunnelTransfer(0, 100, b"b" * 100)
    a.send(TunnelClose(0))
    assert b.recv() == TunnelClosed(5, "")
    assert a.recv() == TunnelClosed(0, "")
    for peer in (a, b):
        peer.assert_silent(0.1)


def test_16_mib_message_through_raw_tunnel(relay, raw):
    """The sender spends the relay's 4 MiB grant and waits for its return."""
    a, b = raw(relay.port).handshake(), raw(relay.port).handshake("t")
    open_raw_tunnel(a, b)
    message = random.Random(16).randbytes(16 * MiB)
    allowance, received, sent = RELAY_BUFFER, [], 0

    def take(packet) -> None:
        nonlocal allowance
        assert packet.id == 0 and type(packet) is TunnelAllow
        allowance += packet.size

    while sent < len(message):
        while allowance < min(CHUNK, len(message) - sent):
            take(a.recv())
        chunk = message[sent : sent + CHUNK]
        a.send(TunnelTransfer(0, 0 if sent else len(message), chunk))
        allowance -= len(chunk)
        sent += len(chunk)
        while b.pending or _readable(b):
            received.append(b.recv())
    while sum(len(p.chunk) for p in received) < len(message):
        received.append(b.recv())
    assert all(type(p) is TunnelTransfer and p.id == 5 for p in received)
    assert [p.size for p in received] == [len(message)] + [0] * (len(received) - 1)
    assert b"".join(p.chunk for p in received) == message


def test_binding_sends_a_200000_byte_message_as_four_chunks(relay, raw, attach):
    member = raw(relay.port).handshake("chunks")
    conn = attach.connect(relay.port)
    opened = []
    opener = threading.Thread(target=lambda: opened.append(conn.tunnel("chunks", 2)))
    opener.start()
    offer = member.recv()
    member.send(TunnelConfirm(offer.build_id, 1), TunnelAllow(1, 64 * MiB))
    opener.join(5)
    tunnel = opened[0]
    assert member.recv() == TunnelAllow(1, RELAY_BUFFER)
    message = random.Random(2).randbytes(200_000)
    tunnel.send(message, timeout=5)
    chunks = [member.recv() for _ in range(4)]
    assert [c.size for c in chunks] == [200000, 0, 0, 0]
    assert [len(c.chunk) for c in chunks] == [65536, 65536, 65536, 3392]
    assert b"".join(c.chunk for c in chunks) == message
    # The binding reassembles the same way; the relay returns the member's
    # allowance as it forwards the chunks.
    member.send(*chunks)
    assert tunnel.recv(5) == message
    returned = 0
    while returned < 200_000:
        packet = member.recv()
        assert type(packet) is TunnelAllow and packet.id == 1
        returned += packet.size
    assert returned == 200_000


def test_a_started_message_completes_past_the_allowance(relay, raw):
    """The relay checks allowance before a message's first chunk only."""
    a, b = raw(relay.port).handshake(), raw(relay.port).handshake("t")
    open_raw_tunnel(a, b, grant=CHUNK)
    for message in (b"1" * 200_000, b"2" * 200_000):
        for pos in range(0, len(message), CHUNK):
            a.send(TunnelTransfer(0, 0 if pos else len(message), message[pos : pos + CHUNK]))
    first = [b.recv() for _ in range(4)]
    assert b"".join(p.chunk for p in first) == b"1" * 200_000
    b.assert_silent()  # the second message waits: the grant is overdrawn
    b.send(TunnelAllow(5, 200_000))
    second = [b.recv() for _ in range(4)]
    assert [p.size for p in second] == [200_000, 0, 0, 0]
    assert b"".join(p.chunk for p in second) == b"2" * 200_000


def test_data_sent_before_a_close_is_delivered(relay, raw):
    """Queued for want of allowance when the sender closes: still delivered, then the close."""
    a, b = raw(relay.port).handshake(), raw(relay.port).handshake("t")
    open_raw_tunnel(a, b, grant=0)
    a.send(TunnelTransfer(0, 3, b"bye"), TunnelClose(0))
    assert a.recv() == TunnelClosed(0, "")
    assert b.recv() == TunnelTransfer(5, 3, b"bye")
    assert b.recv() == TunnelClosed(5, "")


def test_tunnel_ends_when_a_side_disconnects(relay, raw):
    a, b = raw(relay.port).handshake(), raw(relay.port).handshake("t")
    open_raw_tunnel(a, b)
    b.close()
    assert a.recv() == TunnelClosed(0, "remote end disconnected")


def test_tunnel_to_own_cluster_then_leaving(relay, raw, attach):
    """Both ends of the tunnel on one connection; leaving must not upset the relay."""
    member = raw(relay.port).handshake("loop")
    member.send(TunnelInit(0, "loop", 1000))
    offer = member.recv()
    member.send(TunnelConfirm(offer.build_id, 1))
    assert member.recv() == TunnelAllow(1, RELAY_BUFFER)
    assert member.recv() == TunnelResult(0, False, CHUNK)
    member.send(Close())
    packets = member.expect_eof()
    assert packets[-1] == Closed("") and type(packets[-1]) is Closed
    attach.register(relay.port, "after", Echo())
    assert attach.connect(relay.port).request("after", b"alive", 1) == b"alive"


def test_oversized_tunnel_chunk_is_a_violation(relay, raw):
    a, b = raw(relay.port).handshake(), raw(relay.port).handshake("t")
    open_raw_tunnel(a, b)
    a.send(TunnelTransfer(0, CHUNK + 1, bytes(CHUNK + 1)))
    packets = a.expect_eof()
    assert len(packets) == 1 and "exceeds 65536" in packets[0].reason
    assert b.recv() == TunnelClosed(5, "remote end disconnected")


def test_tunnel_build_times_out_without_confirm(relay, raw):
    member = raw(relay.port).handshake("shy")
    client = raw(relay.port).handshake()
    start = time.monotonic()
    client.send(TunnelInit(3, "shy", 200))
    offer = member.recv()
    assert client.recv() == TunnelResult(3, True)
    assert 0.195 <= time.monotonic() - start <= 0.2 + LATE
    member.send(TunnelConfirm(offer.build_id, 9))  # too late: refused, not a violation
    assert member.recv() == TunnelClosed(9, "tunnel build expired")
    client.assert_silent(0.1)


# ---------------------------------------------------------------------------
# Malformed input: only the offending connection ends.

HEALTHY_PREFIX = Init().encode()


def _garbage() -> bytes:
    data = random.Random(7).randbytes(4096)
    with pytest.raises(codec.ProtocolError):  # precondition: the codec refuses it
        codec.Decoder(codec.Side.CLIENT, MiB).feed(HEALTHY_PREFIX + data)
    return data


MALFORMED = {
    "random garbage": lambda: HEALTHY_PREFIX + _garbage(),
    "bad magic": lambda: b"\x00\x10iris-relay-magic\x0bv1.0-draft2\x00",
    "unknown opcode": lambda: HEALTHY_PREFIX + b"\x0e",
    "bad bool": lambda: HEALTHY_PREFIX + b"\x05\x01\x02",
    "oversized length": lambda: HEALTHY_PREFIX + b"\x03\x04echo" + codec.encode_varint(MiB + 1),
    "first packet not INIT": lambda: Subscribe("topic").encode(),
    "over-long varint": lambda: HEALTHY_PREFIX + b"\x0d" + b"\x80" * 11,
    "INIT twice": lambda: HEALTHY_PREFIX * 2,
    "DENY from a client": lambda: HEALTHY_PREFIX + Deny("no").encode(),
}


@pytest.fixture
def guarded_relay(relay_factory, attach):
    """A relay (max message 1 MiB) with a Bystander, served before the test
    starts; yields the relay, then checks that every request succeeded
    throughout."""
    relay = relay_factory("--max-message", "1MiB")
    bystander = Bystander(relay.port, attach)
    bystander.still_served(0)
    yield relay
    try:
        bystander.still_served(10)
    finally:
        bystander.stop()
    assert bystander.conn.request("echo", b"after", 1) == b"after"


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_input_closes_only_the_offender(guarded_relay, raw, name):
    relay = guarded_relay
    bystander = raw(relay.port).handshake()
    bystander.send(Subscribe("watch"))
    offender = raw(relay.port)
    offender.send_bytes(MALFORMED[name]())
    packets = offender.expect_eof(timeout=5)
    if packets and type(packets[0]) is codec.Accept:
        packets = packets[1:]
    assert len(packets) == 1 and type(packets[0]) is Closed, packets
    assert packets[0].reason.startswith("protocol violation: ")
    wait_for(lambda: "protocol violation" in relay.log())
    bystander.send(Publish("watch", b"fine"))
    assert bystander.recv() == Publish("watch", b"fine")


def test_truncated_packet_then_close(guarded_relay, raw):
    relay = guarded_relay
    offender = raw(relay.port).handshake("half")
    wire = RequestPacket(1, "echo", b"x" * 1000, 1000).encode()
    offender.send_bytes(wire[: len(wire) // 2])
    offender.close()
    wait_for(lambda: "detached" in relay.log())
    bystander = raw(relay.port).handshake()
    bystander.send(RequestPacket(2, "half", b"x", 100))  # the half-sent member is gone
    assert bystander.recv() == ReplyDelivery(2, True)


def test_oversized_message_is_refused_before_its_payload(guarded_relay, raw):
    """The relay hangs up on the length alone; it never waits for the 1 MiB."""
    relay = guarded_relay
    offender = raw(relay.port).handshake()
    start = time.monotonic()
    offender.send_bytes(b"\x08\x05topic" + codec.encode_varint(MiB + 1) + b"partial")
    packets = offender.expect_eof(timeout=5)
    assert time.monotonic() - start < 1
    assert "exceeds" in packets[0].reason
    # Exactly the limit is fine.
    ok = raw(relay.port).handshake()
    ok.send(Subscribe("big"), Publish("big", bytes(MiB)))
    assert ok.recv(10) == Publish("big", bytes(MiB))


def test_peer_that_stops_reading_is_dropped(relay_factory, raw, attach):
    relay = relay_factory("--outbound-cap", "512KiB")
    attach.register(relay.port, "echo", Echo())
    stuck = raw(relay.port, rcvbuf=4096).handshake()
    stuck.send(Subscribe("flood"))
    reader = attach.connect(relay.port)
    got = []
    reader.subscribe("flood", got.append)
    publisher = attach.connect(relay.port)
    publisher.publish("flood", b"warm-up")  # both subscriptions are in place
    wait_for(lambda: got == [b"warm-up"] and _readable(stuck))
    event, published = bytes(64 * 1024), 0
    while "stopped reading" not in relay.log():
        publisher.publish("flood", event)
        published += 1
        assert published < 1000, "the stuck peer was never dropped"
        if published % 16 == 0:
            time.sleep(0.01)  # let the relay's log catch up
    assert published * len(event) > 512 * 1024
    assert publisher.request("echo", b"fine", 2) == b"fine"
    wait_for(lambda: len(got) == published + 1)  # the reader missed nothing
    received = 0
    while True:  # the stuck peer: what was buffered, then the end
        try:
            data = stuck.sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not data:
            break
        received += len(data)
    assert received < published * len(event)


def stuck_subscriber(raw, port: int, topic: str):
    """A raw subscriber with a tiny receive window that never reads."""
    stuck = raw(port, rcvbuf=4096).handshake()
    stuck.send(Subscribe(topic), Publish(topic, b"subscribed"))
    assert stuck.recv() == Publish(topic, b"subscribed")
    return stuck


def test_backlog_of_a_slow_reader_costs_linear_time(relay, raw, attach):
    """96 MiB queued for a reader that is slow, not yet dropped (the default cap
    is 256 MiB): the relay keeps up, and others are served meanwhile."""
    attach.register(relay.port, "echo", Echo())
    stuck_subscriber(raw, relay.port, "flood")
    publisher = attach.connect(relay.port)
    event = bytes(64 * 1024)
    start = time.monotonic()
    for _ in range(1536):
        publisher.publish("flood", event)
    assert publisher.request("echo", b"served", 10) == b"served"
    assert time.monotonic() - start < 5  # about 0.2 s (3 s at load 14); copying it per turn: 10+ s


def test_lingering_peer_does_not_busy_loop_the_relay(relay, raw, attach):
    """A peer dropped with output it does not read, and input the relay no
    longer reads, must not keep the relay's loop spinning."""
    stuck = stuck_subscriber(raw, relay.port, "flood")
    publisher = attach.connect(relay.port)
    for _ in range(64):
        publisher.publish("flood", bytes(64 * 1024))
    publisher.publish("flood", b"sync")
    time.sleep(0.2)  # the relay's output to the stuck peer is backed up
    stuck.send_bytes(b"\x0e")  # a violation: dropped, lingering with unsent output
    stuck.sock.shutdown(socket.SHUT_WR)  # and an EOF it will never read
    wait_for(lambda: "unknown opcode" in relay.log())
    busy = cpu_share(relay.proc.pid, 1.0)
    assert busy < 0.3, f"relay used {busy:.0%} of a core while idle"
    attach.register(relay.port, "echo", Echo())
    assert publisher.request("echo", b"fine", 1) == b"fine"


# Random but well-formed traffic from a member of "fuzz": small ids and timeouts,
# so requests, builds and tunnels of its own (and the echo service's) interact.
small_ids = st.integers(0, 4)
short_ms = st.integers(0, 30)
cluster_names = st.sampled_from(["fuzz", "echo", "nobody"])
blobs = st.binary(max_size=64)
fuzz_packets = st.one_of(
    st.builds(BroadcastPacket, cluster_names, blobs),
    st.builds(RequestPacket, small_ids, cluster_names, blobs, short_ms),
    st.builds(ReplyPacket, small_ids, st.just(True), blobs),
    st.builds(ReplyPacket, small_ids, st.just(False), st.text(max_size=8)),
    st.builds(Subscribe, st.sampled_from(["a", "b"])),
    st.builds(codec.Unsubscribe, st.sampled_from(["a", "b"])),
    st.builds(Publish, st.sampled_from(["a", "b"]), blobs),
    st.builds(TunnelInit, small_ids, cluster_names, short_ms),
    st.builds(TunnelConfirm, small_ids, small_ids),
    st.builds(TunnelAllow, small_ids, st.integers(0, 2**20)),
    st.builds(TunnelTransfer, small_ids, st.integers(0, 100), blobs),
    st.builds(TunnelClose, small_ids),
)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(fuzz_packets, max_size=25), st.sampled_from([0, 0.002]))
def test_random_traffic_never_upsets_the_relay(relay, raw, attach, packets, pause):
    """Whatever a member sends, the relay answers in valid packets, ends at most
    that connection, and keeps serving everyone else. One relay for all examples."""
    if not attach.opened:
        attach.register(relay.port, "echo", Echo())
    peer = raw(relay.port).handshake("fuzz")
    try:
        for packet in packets:
            peer.send(packet)
            time.sleep(pause)  # sometimes let deadlines and deliveries interleave
        time.sleep(0.03)  # every timeout above has passed
        peer.send(Close())
    except (BrokenPipeError, ConnectionResetError):
        pass  # dropped for a violation (e.g. reusing an open tunnel id): allowed
    ending = peer.expect_eof()  # RawPeer's decoder vouches for every packet
    closes = [p for p in ending if type(p) is Closed]
    assert closes == ending[-1:] or not closes  # at most one CLOSE, and it is the last
    for close in closes:
        assert close.reason == "" or close.reason.startswith("protocol violation"), close
    peer.close()
    assert attach.connect(relay.port).request("echo", b"alive", 2) == b"alive"


# ---------------------------------------------------------------------------
# The command line.


def run_relay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iris.relay", *args],
        capture_output=True,
        text=True,
        timeout=10,
    )


@pytest.mark.parametrize(
    "args", [["--net", "prod"], ["--rsa", "key.pem"], ["--net", "prod", "--rsa", "key.pem"]]
)
def test_network_options_are_refused(args):
    result = run_relay("--port", "0", *args)
    assert result.returncode != 0
    assert "single-node" in result.stderr
    assert result.stdout == ""


def test_busy_port_exits_non_zero_naming_the_port(relay):
    result = run_relay("--port", str(relay.port))
    assert result.returncode != 0
    assert str(relay.port) in result.stderr and "in use" in result.stderr
    assert result.stdout == ""


def test_bad_size_argument(relay):
    result = run_relay("--max-message", "lots")
    assert result.returncode == 2 and "--max-message: expected a size" in result.stderr


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--handshake-timeout", "0"], "--handshake-timeout: expected seconds from 0.001 to 86400"),
        (["--packet-timeout", "soon"], "--packet-timeout: expected seconds from 0.001 to 86400"),
        (["--packet-timeout", "inf"], "--packet-timeout: expected seconds from 0.001 to 86400"),
        (["--max-message", "1MiB", "--partial-budget", "1MiB"], "smaller than the largest packet"),
    ],
)
def test_bad_input_limits_are_refused(args, complaint):
    result = run_relay("--port", "0", *args)
    assert result.returncode == 2 and complaint in result.stderr, result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------------------
# In-process use.


class DropRecorder(Echo):
    def __init__(self):
        super().__init__()
        self.dropped = threading.Event()
        self.reason = None

    def handle_drop(self, reason: Exception) -> None:
        self.reason = reason
        self.dropped.set()


def test_in_process_start_and_stop(attach):
    server = RelayServer(0).start()
    try:
        handler = DropRecorder()
        attach.register(server.port, "echo", handler)
        conn = attach.connect(server.port)
        assert conn.request("echo", b"in process", 1) == b"in process"
        assert server.addresses == [f"127.0.0.1:{server.port}", f"[::1]:{server.port}"]
    finally:
        server.stop()
    assert handler.dropped.wait(5)
    assert "relay shutting down" in str(handler.reason)
    wait_for(lambda: conn.closed)
    with pytest.raises(ConnectionRefusedError):
        iris.connect(server.port)


def test_in_process_context_manager(attach):
    with RelayServer(0) as server:
        attach.register(server.port, "echo", Echo())
        with iris.connect(server.port) as conn:
            assert conn.request("echo", b"managed", 1) == b"managed"
        server.stop()  # stopping early, then leaving the block, is fine
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        iris.connect(server.port)


def test_in_process_over_ipv6():
    with RelayServer(0) as server:
        peer = socket.create_connection(("::1", server.port))
        with peer:
            peer.sendall(Init().encode())
            decoder = codec.Decoder(codec.Side.RELAY)
            assert decoder.feed(peer.recv(1024)) == [codec.Accept()]
