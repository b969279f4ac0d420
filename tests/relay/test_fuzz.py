"""Hostile input on the wire: the relay's socket and the binding's socket.

- The relay (a real process, 1 MiB messages) gets adversarial streams over raw
  sockets: it must close the offending connection alone, change nothing for
  harmless packets (replies to ids never issued, tunnel packets for ids never
  opened, allowances near 2**70), survive, and keep serving a client that
  requests from an echo service the whole time.
- A client of a hostile relay (a listening socket of ours) must end every
  pending call with a reply, a RemoteError, an iris.TimeoutError or a
  ClosedError, never hang, and raise nothing on its own threads.

binding/test_codec.py fuzzes the pure decoder, test_relay.py well-formed
traffic; irishost's frame decoder and config loader are fuzzed in
host/test_host_fuzz.py.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from bystander import Bystander
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from raw_tunnel import CHUNK, MiB, open_raw_tunnel
from support import wait_for

import iris
from iris import codec
from iris.codec import (
    Accept,
    BroadcastDelivery,
    BroadcastPacket,
    Close,
    Closed,
    Deny,
    Init,
    Op,
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
    TunnelOffer,
    TunnelResult,
    TunnelTransfer,
    Unsubscribe,
)
from iris.session import RELAY_GRACE

# The largest value a varint may carry: ten octets of seven bits.
MAX_VARINT = 2**70 - 1
# How long the relay may take to act on a packet on a loaded two-core machine.
PROMPT = 2.0

# One relay serves every example of a test, so the examples run quickly and a
# harm done by one would show in the next.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Echo(iris.ServiceHandler):
    def __init__(self):
        self.drops: list[Exception] = []

    def handle_request(self, request: bytes) -> bytes:
        return request

    def handle_drop(self, reason: Exception) -> None:
        self.drops.append(reason)


# ---------------------------------------------------------------------------
# The relay.


@pytest.fixture
def hostile(relay_factory, attach):
    """A relay with 1 MiB messages and a bystander; at teardown the relay must
    be alive, have met no internal error, and the bystander must have been
    served throughout (relay_factory then checks its clean exit)."""
    relay = relay_factory("--max-message", "1MiB")
    bystander = Bystander(relay.port, attach)
    relay.bystander = bystander
    yield relay
    try:
        bystander.still_served()
    finally:
        bystander.stop()
    assert relay.proc.poll() is None, f"relay died:\n{relay.log()}"
    assert "internal error" not in relay.log()


ids = st.integers(0, MAX_VARINT)
far_timeouts = st.integers(2**31, MAX_VARINT)  # past what epoll can wait for at once
names = st.text(max_size=8)
small_blobs = st.binary(max_size=64)
oversized_chunks = st.integers(CHUNK + 1, CHUNK + 64).map(bytes)

# Packets a relay must take without a word: nothing they name exists. Each
# comes with what the relay answers (only an unknown build gets an answer).
silent_packets = st.one_of(
    st.builds(ReplyPacket, ids, st.just(True), small_blobs),
    st.builds(ReplyPacket, ids, st.just(False), names),
    st.builds(TunnelAllow, ids, ids),
    st.builds(TunnelTransfer, ids, ids, small_blobs | oversized_chunks),
    st.builds(TunnelClose, ids),
    st.builds(Unsubscribe, names),
    st.builds(BroadcastPacket, names, small_blobs),
    st.builds(Publish, names.map("nobody-{}".format), small_blobs),
    st.builds(RequestPacket, ids, names.map("nobody-{}".format), small_blobs, far_timeouts),
).map(lambda packet: (packet, []))
unknown_builds = st.builds(TunnelConfirm, ids, ids).map(
    lambda packet: (packet, [TunnelClosed(packet.id, "tunnel build expired")])
)
harmless = st.lists(silent_packets | unknown_builds, max_size=12)


def _op(op: Op) -> bytes:
    return bytes((op,))


@st.composite
def violations(draw) -> bytes:
    """Bytes the relay must answer with CLOSE("protocol violation: ...")."""
    kind = draw(
        st.sampled_from(["long varint", "oversized", "bad bool", "opcode", "deny", "init", "utf-8"])
    )
    if kind == "long varint":  # ten or more octets with the continuation bit
        op = draw(st.sampled_from([Op.REQUEST, Op.REPLY, Op.TUN_ALLOW, Op.TUN_CLOSE]))
        octets = draw(st.lists(st.integers(0x80, 0xFF), min_size=10, max_size=24))
        return _op(op) + bytes(octets) + b"\x00"
    if kind == "oversized":  # a length over the relay's --max-message
        size = draw(st.integers(MiB + 1, MAX_VARINT))
        head = draw(
            st.sampled_from(
                [
                    _op(Op.PUBLISH) + b"\x01t",
                    _op(Op.BROADCAST) + b"\x04echo",
                    _op(Op.REQUEST) + b"\x07\x04echo",
                    _op(Op.SUBSCRIBE),
                    _op(Op.TUN_TRANSFER) + b"\x00\x00",
                ]
            )
        )
        return head + codec.encode_varint(size) + draw(small_blobs)
    if kind == "bad bool":
        return _op(Op.REPLY) + codec.encode_varint(draw(ids)) + bytes([draw(st.integers(2, 255))])
    if kind == "opcode":
        return bytes([draw(st.integers(0x0E, 0xFF))]) + draw(small_blobs)
    if kind == "deny":
        return Deny(draw(names)).encode()
    if kind == "init":  # a second handshake
        return Init(draw(names)).encode()
    invalid = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"a\x80"]))
    return _op(Op.SUBSCRIBE) + codec.encode_varint(len(invalid)) + invalid


@st.composite
def truncations(draw) -> bytes:
    """An unfinished packet: the relay must wait for the rest, not object."""
    kind = draw(st.sampled_from(["near max", "prefix", "varint"]))
    if kind == "near max":  # a length at or just under the limit, payload cut short
        size = draw(st.integers(MiB - 4096, MiB))
        partial = draw(st.binary(max_size=4096))
        return _op(Op.PUBLISH) + b"\x01t" + codec.encode_varint(size) + partial
    if kind == "prefix":
        packet, _ = draw(silent_packets)
        wire = packet.encode()
        return wire[: draw(st.integers(1, len(wire) - 1))] if len(wire) > 1 else b""
    octets = draw(st.lists(st.integers(0x80, 0xFF), min_size=1, max_size=9))
    return _op(Op.TUN_CLOSE) + bytes(octets)


endings = st.one_of(
    st.tuples(st.just("close"), st.just(Close().encode())),
    st.tuples(st.just("violation"), violations()),
    st.tuples(st.just("truncated"), truncations()),
    st.tuples(st.just("random"), st.binary(min_size=1, max_size=300)),
)


def _decodes_until(data: bytes) -> tuple[list, bool]:
    """The packets a relay's decoder gets from ``data`` and whether it then fails."""
    decoder, packets = codec.Decoder(codec.Side.CLIENT, MiB), []
    for i in range(len(data)):
        try:
            packets += decoder.feed(data[i : i + 1])
        except codec.ProtocolError:
            return packets, True
    return packets, False


def _send_quietly(peer, data: bytes) -> None:
    """Send; the relay may rightly have hung up already."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        peer.send_bytes(data)


@FUZZ
@given(st.sampled_from(["", "fuzz"]), harmless, endings)
@example("", [], ("violation", _op(Op.REQUEST) + b"\xff" * 10 + b"\x00"))
@example("fuzz", [(TunnelAllow(7, 2**64 + 1), [])], ("close", Close().encode()))
def test_hostile_streams_close_only_the_offender(hostile, raw, cluster, packets, ending):
    relay = hostile
    peer = raw(relay.port).handshake(cluster)
    expected = [answer for _, answers in packets for answer in answers]
    probe = f"probe-{uuid.uuid4().hex}"
    peer.send(*(packet for packet, _ in packets), Subscribe(probe), Publish(probe, b"alive"))
    # Harmless packets changed nothing: only the expected answers, then the probe.
    answers = [peer.recv() for _ in range(len(expected) + 1)]
    assert answers == [*expected, Publish(probe, b"alive")]

    kind, data = ending
    started = time.monotonic()
    _send_quietly(peer, data)
    if kind in ("truncated", "random"):
        peer.sock.shutdown(socket.SHUT_WR)  # the relay sees the end of our stream
    tail = peer.expect_eof(timeout=5)
    elapsed = time.monotonic() - started

    closes = [packet for packet in tail if type(packet) is Closed]
    assert closes == tail[-1:] or not closes, tail  # at most one CLOSE, and it is the last
    if kind == "close":
        assert tail == [Closed("")]
    elif kind == "violation":
        assert len(tail) == 1 and tail[0].reason.startswith("protocol violation: "), tail
        assert elapsed < PROMPT, f"took {elapsed:.2f} s to close on a violation"
    elif kind == "truncated":
        assert tail == []  # waited for the rest; our end of stream ended it quietly
    else:
        decoded, fails = _decodes_until(data)
        if fails and not any(type(packet) is Close for packet in decoded):
            assert closes and closes[0].reason.startswith("protocol violation: "), tail
        for close in closes:
            assert close.reason == "" or close.reason.startswith("protocol violation: "), tail
    peer.close()
    assert relay.proc.poll() is None


def test_far_timeouts_keep_the_relay_serving(relay, raw, attach):
    """A timeout past 2**31 ms is legal on the wire, but epoll cannot wait that
    long in one call: the relay used to die of the OverflowError as soon as
    such a deadline was its nearest. A quiet relay, so that it is."""
    peer = raw(relay.port).handshake()
    for timeout in (2**31, 2**32, 10**12, MAX_VARINT):
        peer.send(RequestPacket(timeout % 1000, "nobody", b"x", timeout))
    time.sleep(0.2)  # the loop now waits for the nearest of them
    assert relay.proc.poll() is None, f"relay died:\n{relay.log()}"
    attach.register(relay.port, "echo", Echo())
    assert attach.connect(relay.port).request("echo", b"still serving", 2) == b"still serving"
    peer.assert_silent(0.1)


def test_allowance_overflow_on_an_open_tunnel(hostile, raw):
    """Grants summing past 2**64 are just large: data flows, the relay still
    holds each sender to its own 4 MiB buffer, and nothing else is upset."""
    relay = hostile
    a, b = raw(relay.port).handshake(), raw(relay.port).handshake("t")
    open_raw_tunnel(a, b, grant=None)
    for size in (2**64 - 1, 2**64 - 1, MAX_VARINT):
        a.send(TunnelAllow(0, size))
        b.send(TunnelAllow(5, size))
    a.send(TunnelTransfer(0, 3, b"a2b"))
    b.send(TunnelTransfer(5, 3, b"b2a"))
    # Each gets the other's message, and its own buffer back as the relay forwards.
    assert {a.recv(), a.recv()} == {TunnelTransfer(0, 3, b"b2a"), TunnelAllow(0, 3)}
    assert {b.recv(), b.recv()} == {TunnelTransfer(5, 3, b"a2b"), TunnelAllow(5, 3)}
    # The member's huge grant does not lift the relay's own limit for the initiator.
    a.send(TunnelTransfer(0, CHUNK + 1, bytes(CHUNK + 1)))
    assert "exceeds 65536" in a.expect_eof()[-1].reason
    assert b.recv() == TunnelClosed(5, "remote end disconnected")
    relay.bystander.still_served()


# ---------------------------------------------------------------------------
# The binding against a hostile relay.


class FakeRelay:
    """A loopback listener of ours that plays the relay for one client."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5)
        self.port = self.listener.getsockname()[1]
        self.sock: socket.socket | None = None
        self.decoder = codec.Decoder(codec.Side.CLIENT)
        self.received: list = []

    def accept(self) -> Init:
        """Take the client's connection and its INIT; the answer is up to the caller."""
        self.sock, _ = self.listener.accept()
        self.sock.settimeout(5)
        return self.read(1)[0]

    def read(self, count: int) -> list:
        """Until ``count`` more packets arrived from the client; return those."""
        start = len(self.received)
        while len(self.received) < start + count:
            data = self.sock.recv(1 << 16)
            assert data, "the client hung up"
            self.received += self.decoder.feed(data)
        return self.received[start : start + count]

    def send(self, data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.listener.close()


@pytest.fixture
def fake_relay():
    fakes: list[FakeRelay] = []

    def make() -> FakeRelay:
        fakes.append(FakeRelay())
        return fakes[-1]

    yield make
    for fake in fakes:
        fake.close()


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that escaped any thread (the binding's reader, its pools)."""
    errors: list[str] = []
    monkeypatch.setattr(
        threading, "excepthook", lambda args: errors.append(f"{args.thread}: {args.exc_value!r}")
    )
    return errors


def attach_to(fake: FakeRelay, member: Echo | None):
    """``iris.connect`` (or ``iris.register`` with ``member``) to the fake
    relay, which accepts; returns the connection and the service, if any."""
    with ThreadPoolExecutor(1) as pool:
        if member is None:
            attached = pool.submit(iris.connect, fake.port)
        else:
            attached = pool.submit(iris.register, fake.port, "svc", member)
        init = fake.accept()
        assert init == Init("svc" if member else "")
        fake.send(Accept().encode())
        result = attached.result(15)  # 5 s once ran out on a machine at load 15
    return (result, None) if member is None else (result.conn, result)


# Ids 0-2 are the client's pending requests; the rest are unknown to it.
client_ids = st.integers(0, 3) | ids
relay_packets = st.one_of(
    st.builds(ReplyDelivery, client_ids, st.just(True)),
    st.builds(ReplyDelivery, client_ids, st.just(False), st.just(True), small_blobs),
    st.builds(ReplyDelivery, client_ids, st.just(False), st.just(False), names),
    st.builds(RequestDelivery, ids, small_blobs, st.integers(0, MAX_VARINT)),
    st.builds(BroadcastDelivery, small_blobs),
    st.builds(Publish, names, small_blobs),
    st.builds(TunnelOffer, ids, st.integers(0, MAX_VARINT)),
    st.builds(TunnelResult, client_ids, st.booleans(), st.integers(0, MAX_VARINT)),
    st.builds(TunnelAllow, client_ids, ids),
    st.builds(TunnelTransfer, client_ids, ids, small_blobs),
    st.builds(TunnelClosed, client_ids, names),
    st.builds(Closed, names),
    st.builds(Accept, names),
    st.builds(Deny, names),
)
relay_garbage = st.one_of(
    st.binary(max_size=200),
    st.integers(0x0E, 0xFF).map(lambda op: bytes([op])),  # unknown opcodes
    st.sampled_from([_op(Op.SUBSCRIBE) + b"\x01t", _op(Op.UNSUBSCRIBE) + b"\x01t"]),
    st.integers(2, 255).map(lambda octet: _op(Op.REPLY) + b"\x00" + bytes([octet])),
    st.just(_op(Op.TUN_CLOSE) + b"\xff" * 12),
    st.integers(codec.MAX_MESSAGE + 1, MAX_VARINT).map(  # over the binding's limit
        lambda size: _op(Op.BROADCAST) + codec.encode_varint(size)
    ),
    st.integers(codec.MAX_MESSAGE - 100, codec.MAX_MESSAGE).map(  # near it, never finished
        lambda size: _op(Op.PUBLISH) + b"\x01t" + codec.encode_varint(size) + b"partial"
    ),
)
OUTCOMES = (bytes, iris.RemoteError, iris.TimeoutError, iris.ClosedError)


@FUZZ
@given(
    st.booleans(),
    st.lists(relay_packets, max_size=10),
    st.none() | relay_garbage,
    st.sampled_from([0, 0.01]),
)
def test_client_of_a_hostile_relay_ends_every_call(
    fake_relay, thread_errors, as_member, packets, garbage, pause
):
    fake = fake_relay()
    member = Echo() if as_member else None
    conn, service = attach_to(fake, member)
    timeout = 1.0
    with ThreadPoolExecutor(3) as callers:

        def call(number: int):
            started = time.monotonic()
            try:
                result = conn.request("svc", b"call %d" % number, timeout)
            except Exception as err:
                result = err
            return result, time.monotonic() - started

        calls = [callers.submit(call, number) for number in range(3)]
        fake.read(3)  # every call is pending before the hostile bytes go out
        fake.send(b"".join(packet.encode() for packet in packets) + (garbage or b""))
        time.sleep(pause)
        fake.sock.shutdown(socket.SHUT_RDWR)
        fake.sock.close()
        results = [future.result(timeout + RELAY_GRACE + PROMPT) for future in calls]

    for result, elapsed in results:
        assert isinstance(result, OUTCOMES), repr(result)
        assert elapsed < timeout + RELAY_GRACE + 1.0
    wait_for(lambda: conn.closed, what="connection closed")
    with pytest.raises(iris.ClosedError):
        conn.request("svc", b"after", timeout)
    if member is not None:
        wait_for(lambda: member.drops, what="handle_drop")
        assert len(member.drops) == 1 and isinstance(member.drops[0], iris.ClosedError)
        service.unregister()
    assert thread_errors == []


def test_a_silent_relay_times_out_calls_instead_of_hanging(fake_relay, thread_errors):
    """A relay that takes requests and never answers: the binding's own grace
    period ends each call with TimeoutError."""
    fake = fake_relay()
    conn, _ = attach_to(fake, None)
    started = time.monotonic()
    with pytest.raises(iris.TimeoutError):
        conn.request("svc", b"into the void", 0.05)
    assert time.monotonic() - started < 0.05 + RELAY_GRACE + PROMPT
    fake.close()
    wait_for(lambda: conn.closed, what="connection closed")
    assert thread_errors == []


@settings(max_examples=100)
@given(st.binary(max_size=200) | st.lists(relay_packets, min_size=1, max_size=3).map(
    lambda packets: b"".join(packet.encode() for packet in packets)
))  # fmt: skip
def test_hostile_handshake_answers_raise_promptly(data):
    """Whatever comes back for INIT, then a hang-up: connect returns a
    connection, or raises a ConnectionError or a ProtocolError, at once."""
    fake = FakeRelay()
    try:
        with ThreadPoolExecutor(1) as pool:
            attached = pool.submit(iris.connect, fake.port)
            fake.accept()
            fake.send(data)
            fake.sock.close()
            try:
                conn = attached.result(PROMPT)
            except (ConnectionError, codec.ProtocolError):
                return
        assert data[:1] == bytes((Op.INIT,))  # connected only on an acceptance
        wait_for(lambda: conn.closed, what="connection closed")
    finally:
        fake.close()
