"""The pure codec: docs/protocol.md's worked bytes, round trips, and hostile input.

Every input is fed whole, one byte at a time, and followed by the first bytes
of the next packet; the decoder must give the same packets every way.
"""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iris import codec
from iris.codec import (
    Accept,
    BroadcastDelivery,
    BroadcastPacket,
    Close,
    Closed,
    Decoder,
    Deny,
    Init,
    ProtocolError,
    Publish,
    ReplyDelivery,
    ReplyPacket,
    RequestDelivery,
    RequestPacket,
    Side,
    Subscribe,
    TunnelAllow,
    TunnelClose,
    TunnelClosed,
    TunnelConfirm,
    TunnelInit,
    TunnelOffer,
    TunnelResult,
    TunnelTransfer,
    Unsubscribe,
)

MiB = 1 << 20


def decode(side: Side, data: bytes, max_message: int = codec.MAX_MESSAGE) -> list:
    """Feed ``data`` whole and insist it decodes to complete packets only."""
    decoder = Decoder(side, max_message)
    packets = decoder.feed(data)
    assert decoder.buffered == 0
    return packets


def decode_bytewise(side: Side, data: bytes) -> list:
    decoder = Decoder(side)
    packets = []
    for i in range(len(data)):
        packets += decoder.feed(data[i : i + 1])
    assert decoder.buffered == 0
    return packets


def same(decoded: list, expected: list) -> None:
    """Equal packet by packet, including each packet's type and field types.

    NamedTuples compare as plain tuples (Subscribe("a") == Unsubscribe("a")),
    so the types are checked explicitly.
    """
    assert [type(p) for p in decoded] == [type(p) for p in expected]
    assert decoded == expected
    for got, want in zip(decoded, expected, strict=True):
        assert [type(field) for field in got] == [type(field) for field in want]


# ---------------------------------------------------------------------------
# docs/protocol.md section 2 and 4, byte for byte.

CLIENT_INIT = b"\x00\x11iris-client-magic\x0bv1.0-draft2\x00"
SERVICE_INIT = b"\x00\x11iris-client-magic\x0bv1.0-draft2\x04echo"
RELAY_ACCEPT = b"\x00\x10iris-relay-magic\x0bv1.0-draft2"
REQUEST_300 = bytes.fromhex("04 ac 02 04") + b"echo" + b"\x02hi" + bytes.fromhex("e8 07")


@pytest.mark.parametrize(
    "value, wire", [(300, b"\xac\x02"), (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01")]
)
def test_varint_examples(value, wire):
    assert codec.encode_varint(value) == wire
    # Decoded as the id of a TUN_CLOSE, the smallest packet holding one varint.
    same(decode(Side.CLIENT, b"\x0d" + wire), [TunnelClose(value)])


def test_varint_rejects_negative():
    with pytest.raises(ValueError):
        codec.encode_varint(-1)


def test_plain_client_init_bytes():
    assert Init().encode() == CLIENT_INIT
    same(decode(Side.CLIENT, CLIENT_INIT), [Init("", "v1.0-draft2")])


def test_service_init_echoes_cluster():
    assert Init("echo").encode() == SERVICE_INIT
    same(decode(Side.CLIENT, SERVICE_INIT), [Init("echo", "v1.0-draft2")])


def test_relay_acceptance_bytes():
    assert Accept().encode() == RELAY_ACCEPT
    same(decode(Side.RELAY, RELAY_ACCEPT), [Accept("v1.0-draft2")])


def test_request_300_bytes():
    assert RequestPacket(300, "echo", b"hi", 1000).encode() == REQUEST_300
    same(decode(Side.CLIENT, REQUEST_300), [RequestPacket(300, "echo", b"hi", 1000)])


def test_a_fault_text_with_lone_surrogates_is_encoded_with_replacement():
    """A handler's text from surrogateescape must still make an answer."""
    fault = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert ReplyPacket(1, False, fault).encode() == b"\x05\x01\x00\x04caf?"


def test_direction_asymmetries():
    """docs/protocol.md section 4: REPLY, CLOSE and TUN_CLOSE differ by direction."""
    assert ReplyPacket(1, True, b"x").encode() == b"\x05\x01\x01\x01x"
    assert ReplyDelivery(1, False, True, b"x").encode() == b"\x05\x01\x00\x01\x01x"
    assert ReplyDelivery(1, True).encode() == b"\x05\x01\x01"
    assert ReplyPacket(1, False, "no").encode() == b"\x05\x01\x00\x02no"
    assert Close().encode() == b"\x02"
    assert Closed("").encode() == b"\x02\x00"
    assert TunnelClose(5).encode() == b"\x0d\x05"
    assert TunnelClosed(5, "").encode() == b"\x0d\x05\x00"
    assert TunnelResult(0, True).encode() == b"\x0a\x00\x01"
    assert TunnelResult(0, False, 65536).encode() == b"\x0a\x00\x00\x80\x80\x04"


def test_tunnel_example_from_protocol():
    """The packet-by-packet tunnel of docs/protocol.md section 6, both decoders."""
    from_a = [TunnelInit(0, "echo", 1000), TunnelAllow(0, 67108864)]
    from_a.append(TunnelTransfer(0, 100, bytes(100)))
    from_a.append(TunnelClose(0))
    to_b = [TunnelOffer(0, 65536), TunnelAllow(5, 4194304), TunnelTransfer(5, 100, bytes(100))]
    to_b.append(TunnelClosed(5, ""))
    same(decode(Side.CLIENT, b"".join(p.encode() for p in from_a)), from_a)
    same(decode(Side.RELAY, b"".join(p.encode() for p in to_b)), to_b)
    assert TunnelAllow(5, 4194304).encode() == b"\x0b\x05\x80\x80\x80\x02"


def chunk_message(tid: int, message: bytes, limit: int) -> list[TunnelTransfer]:
    """docs/protocol.md section 6 rule 6: the first chunk carries the size, the rest 0."""
    return [
        TunnelTransfer(tid, 0 if pos else len(message), message[pos : pos + limit])
        for pos in range(0, len(message), limit)
    ]


def test_200000_byte_message_chunking():
    message = bytes(range(256)) * 781 + bytes(64)  # 200,000 bytes, not all alike
    assert len(message) == 200_000
    chunks = chunk_message(3, message, 65536)
    assert [c.size for c in chunks] == [200000, 0, 0, 0]
    assert [len(c.chunk) for c in chunks] == [65536, 65536, 65536, 3392]
    wire = b"".join(c.encode() for c in chunks)
    for side in Side:  # TUN_TRANSFER has the same format both ways
        decoded = decode(side, wire)
        same(decoded, chunks)
        assert b"".join(c.chunk for c in decoded) == message
    # The first chunk's header: opcode, tid, size 200000 (varint c0 9a 0c), length 65536.
    assert wire[:9] == b"\x0c\x03\xc0\x9a\x0c\x80\x80\x04\x00"


# ---------------------------------------------------------------------------
# Every packet type round-trips, fed three ways.

CLIENT_PACKETS = [
    Init(),
    Init("echo"),
    Close(),
    BroadcastPacket("echo", b"to all"),
    RequestPacket(300, "echo", b"hi", 1000),
    ReplyPacket(7, True, b"answer"),
    ReplyPacket(7, False, "it broke: ünïcode"),
    Subscribe("news"),
    Unsubscribe("news"),
    Publish("news", b"event"),
    TunnelInit(0, "echo", 1000),
    TunnelConfirm(0, 5),
    TunnelAllow(5, 67108864),
    TunnelTransfer(5, 100, b"x" * 100),
    TunnelTransfer(5, 0, b"continued"),
    TunnelClose(0),
]

RELAY_PACKETS = [
    Accept(),
    Deny("protocol version mismatch"),
    Closed(),
    Closed("relay shutting down"),
    BroadcastDelivery(b"to all"),
    RequestDelivery(2**40, b"hi", 999),
    ReplyDelivery(300, True),
    ReplyDelivery(300, False, True, b"answer"),
    ReplyDelivery(300, False, False, "it broke"),
    Publish("news", b"event"),
    TunnelOffer(0, 65536),
    TunnelResult(0, True),
    TunnelResult(0, False, 65536),
    TunnelAllow(0, 4194304),
    TunnelTransfer(0, 3, b"abc"),
    TunnelClosed(5),
    TunnelClosed(5, "remote end disconnected"),
]

SAMPLES = [(Side.CLIENT, p) for p in CLIENT_PACKETS] + [(Side.RELAY, p) for p in RELAY_PACKETS]


def test_samples_cover_every_opcode():
    client_ops = {p.encode()[0] for p in CLIENT_PACKETS}
    relay_ops = {p.encode()[0] for p in RELAY_PACKETS}
    assert client_ops == set(codec.Op) - {codec.Op.DENY}
    assert relay_ops == set(codec.Op) - {codec.Op.SUBSCRIBE, codec.Op.UNSUBSCRIBE}


@pytest.mark.parametrize("side, packet", SAMPLES, ids=lambda v: type(v).__name__)
def test_each_packet_is_read_by_its_own_reader(side, packet):
    """The reader table of a direction maps an opcode to the reader written
    beside that packet's encoder, and holds no opcode the side may not send."""
    readers = codec.CLIENT_READERS if side is Side.CLIENT else codec.RELAY_READERS
    assert readers[packet.encode()[0]] == type(packet).read
    samples = CLIENT_PACKETS if side is Side.CLIENT else RELAY_PACKETS
    assert set(readers) == {p.encode()[0] for p in samples}


@pytest.mark.parametrize("side, packet", SAMPLES, ids=lambda v: type(v).__name__)
def test_round_trip_whole(side, packet):
    same(decode(side, packet.encode()), [packet])


@pytest.mark.parametrize("side, packet", SAMPLES, ids=lambda v: type(v).__name__)
def test_round_trip_byte_at_a_time(side, packet):
    same(decode_bytewise(side, packet.encode()), [packet])


@pytest.mark.parametrize("side, packet", SAMPLES, ids=lambda v: type(v).__name__)
def test_round_trip_with_trailing_bytes(side, packet):
    follower = TunnelAllow(9, 300)
    wire, tail = packet.encode(), follower.encode()
    for cut in range(1, len(tail)):
        decoder = Decoder(side)
        same(decoder.feed(wire + tail[:cut]), [packet])
        assert decoder.buffered == cut
        same(decoder.feed(tail[cut:]), [follower])
        assert decoder.buffered == 0


@pytest.mark.parametrize("side, packet", SAMPLES, ids=lambda v: type(v).__name__)
def test_every_proper_prefix_is_incomplete_not_an_error(side, packet):
    wire = packet.encode()
    for cut in range(len(wire)):
        decoder = Decoder(side)
        assert decoder.feed(wire[:cut]) == []
        assert decoder.buffered == cut


def test_all_samples_in_one_stream():
    for side, packets in ((Side.CLIENT, CLIENT_PACKETS), (Side.RELAY, RELAY_PACKETS)):
        wire = b"".join(p.encode() for p in packets)
        same(decode(side, wire), packets)
        same(decode_bytewise(side, wire), packets)


def test_large_message_fed_in_reads():
    """A 16 MiB message arriving in 64 KiB reads decodes once, intact."""
    message = bytes(range(256)) * (16 * MiB // 256)
    wire = Publish("big", message).encode() + Close().encode()
    decoder = Decoder(Side.CLIENT)
    packets = []
    for pos in range(0, len(wire), 65536):
        packets += decoder.feed(wire[pos : pos + 65536])
    assert [type(p) for p in packets] == [Publish, Close]
    assert packets[0].event == message


def test_client_and_relay_over_a_socket_pair():
    """Both directions through a real socket, read in small odd-sized pieces."""
    client, relay = socket.socketpair()
    with client, relay:

        def read_all(sock: socket.socket, side: Side, count: int) -> list:
            decoder, packets = Decoder(side), []
            while len(packets) < count:
                data = sock.recv(7)
                assert data, "peer closed early"
                packets += decoder.feed(data)
            assert decoder.buffered == 0
            return packets

        writer = threading.Thread(
            target=client.sendall, args=(b"".join(p.encode() for p in CLIENT_PACKETS),)
        )
        writer.start()
        same(read_all(relay, Side.CLIENT, len(CLIENT_PACKETS)), CLIENT_PACKETS)
        writer.join()
        relay.sendall(b"".join(p.encode() for p in RELAY_PACKETS))
        same(read_all(client, Side.RELAY, len(RELAY_PACKETS)), RELAY_PACKETS)


# ---------------------------------------------------------------------------
# Property tests: random packets of both directions.

ids = st.integers(0, 2**64 - 1)
names = st.text(st.characters(codec="utf-8"), max_size=12)
blobs = st.binary(max_size=200)

client_packets = st.one_of(
    st.builds(Init, names, names),
    st.just(Close()),
    st.builds(BroadcastPacket, names, blobs),
    st.builds(RequestPacket, ids, names, blobs, ids),
    st.builds(ReplyPacket, ids, st.just(True), blobs),
    st.builds(ReplyPacket, ids, st.just(False), names),
    st.builds(Subscribe, names),
    st.builds(Unsubscribe, names),
    st.builds(Publish, names, blobs),
    st.builds(TunnelInit, ids, names, ids),
    st.builds(TunnelConfirm, ids, ids),
    st.builds(TunnelAllow, ids, ids),
    st.builds(TunnelTransfer, ids, ids, blobs),
    st.builds(TunnelClose, ids),
)

relay_packets = st.one_of(
    st.builds(Accept, names),
    st.builds(Deny, names),
    st.builds(Closed, names),
    st.builds(BroadcastDelivery, blobs),
    st.builds(RequestDelivery, ids, blobs, ids),
    ids.map(lambda rid: ReplyDelivery(rid, True)),
    st.builds(ReplyDelivery, ids, st.just(False), st.just(True), blobs),
    st.builds(ReplyDelivery, ids, st.just(False), st.just(False), names),
    st.builds(Publish, names, blobs),
    st.builds(TunnelOffer, ids, ids),
    ids.map(lambda tid: TunnelResult(tid, True)),
    st.builds(TunnelResult, ids, st.just(False), ids),
    st.builds(TunnelAllow, ids, ids),
    st.builds(TunnelTransfer, ids, ids, blobs),
    st.builds(TunnelClosed, ids, names),
)


def feed_in_pieces(decoder: Decoder, data: bytes, cuts: list[int]) -> list:
    packets, start = [], 0
    for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
        packets += decoder.feed(data[start:cut])
        start = max(start, cut)
    return packets


def assert_stream_round_trips(sender: Side, packets: list, cuts: list[int]) -> None:
    """``packets``, encoded into one stream and fed cut at ``cuts``, decode as sent."""
    wire = b"".join(p.encode() for p in packets)
    decoder = Decoder(sender)
    same(feed_in_pieces(decoder, wire, cuts), packets)
    assert decoder.buffered == 0


@settings(max_examples=150)
@given(st.lists(client_packets, max_size=12), st.lists(st.integers(0, 10_000), max_size=8))
def test_client_stream_round_trips(packets, cuts):
    assert_stream_round_trips(Side.CLIENT, packets, cuts)


@settings(max_examples=150)
@given(st.lists(relay_packets, max_size=12), st.lists(st.integers(0, 10_000), max_size=8))
def test_relay_stream_round_trips(packets, cuts):
    assert_stream_round_trips(Side.RELAY, packets, cuts)


# ---------------------------------------------------------------------------
# Hostile input: packets or ProtocolError, nothing else, and bounded buffering.

SMALL_MAX = 64  # a small max_message so random lengths often cross it


def feed_hostile(side: Side, data: bytes, cuts: list[int], max_message: int = SMALL_MAX):
    """Feed ``data``; return the packets, or the ProtocolError that ended it.

    Any other exception fails the test, as does a buffer over the bound.
    """
    decoder = Decoder(side, max_message)
    packets, start = [], 0
    try:
        for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
            packets += decoder.feed(data[start:cut])
            start = max(start, cut)
            assert decoder.buffered <= max_message + codec.PACKET_OVERHEAD
    except ProtocolError as err:
        with pytest.raises(ProtocolError):  # a failed decoder stays failed
            decoder.feed(b"\x02")
        return err
    return packets


@settings(max_examples=300)
@given(st.sampled_from(Side), st.binary(max_size=400), st.lists(st.integers(0, 500), max_size=6))
def test_random_bytes_decode_or_raise_protocol_error(side, data, cuts):
    feed_hostile(side, data, cuts)


@st.composite
def mutated_streams(draw):
    """Valid streams with a few octets overwritten, inserted or cut off."""
    side = draw(st.sampled_from(Side))
    packets = draw(st.lists(client_packets if side is Side.CLIENT else relay_packets, max_size=6))
    wire = bytearray(b"".join(p.encode() for p in packets) or b"\x00")
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(wire) - 1))
        octet = draw(st.integers(0, 255))
        action = draw(st.sampled_from(["set", "insert", "truncate"]))
        if action == "set":
            wire[pos] = octet
        elif action == "insert":
            wire.insert(pos, octet)
        else:
            del wire[pos:]
        if not wire:
            wire.append(octet)
    return side, bytes(wire)


@settings(max_examples=300)
@given(mutated_streams(), st.lists(st.integers(0, 500), max_size=6))
def test_mutated_streams_decode_or_raise_protocol_error(stream, cuts):
    side, data = stream
    feed_hostile(side, data, cuts, max_message=codec.MAX_MESSAGE)


@settings(max_examples=200)
@given(st.integers(1, 2**70 - 1), st.sampled_from([b"\x03\x04echo", b"\x08\x04news", b"\x06"]))
def test_announced_length_is_checked_before_the_payload(size, prefix):
    """A binary's length is judged as soon as its varint is complete."""
    max_message = 1000
    decoder = Decoder(Side.CLIENT, max_message)
    header = prefix + codec.encode_varint(size)
    if size > max_message:
        with pytest.raises(ProtocolError, match="exceeds"):
            for i in range(len(header)):
                decoder.feed(header[i : i + 1])
        assert decoder.buffered == len(header)  # judged on the last octet of the length
    else:
        assert decoder.feed(header) == []
        assert decoder.buffered == len(header)


def test_huge_length_rejected_without_waiting_for_payload():
    decoder = Decoder(Side.CLIENT, max_message=MiB)
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(b"\x03\x04echo" + codec.encode_varint(2**62))
    decoder = Decoder(Side.RELAY, max_message=MiB)
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(b"\x03" + codec.encode_varint(MiB + 1))


def test_exactly_max_message_is_accepted():
    decoder = Decoder(Side.CLIENT, max_message=1000)
    same(decoder.feed(Publish("t", bytes(1000)).encode()), [Publish("t", bytes(1000))])


def test_a_packet_as_a_whole_is_bounded():
    """Two fields each at the limit would double the buffer: refused instead.

    The check fires when the second length arrives, before its payload.
    """
    max_message = MiB
    decoder = Decoder(Side.CLIENT, max_message)
    header = b"\x03" + codec.encode_varint(max_message) + b"c" * max_message
    assert decoder.feed(header) == []
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(codec.encode_varint(max_message))
    assert decoder.buffered <= max_message + codec.PACKET_OVERHEAD


def test_names_and_message_within_the_overhead_are_accepted():
    """A maximum-size message with ordinary names is a valid packet."""
    packet = RequestPacket(2**63, "a-cluster-name", bytes(MiB), 2**32)
    same(decode(Side.CLIENT, packet.encode(), max_message=MiB), [packet])


@pytest.mark.parametrize(
    "side, data, match",
    [
        # varints: ten octets are the most a 64-bit value needs
        (Side.CLIENT, b"\x0d" + b"\x80" * 10 + b"\x01", "varint"),
        (Side.RELAY, b"\x0b" + b"\xff" * 11, "varint"),
        (Side.CLIENT, b"\x04" + b"\x80" * 10, "varint"),
        # bools other than 0x00 and 0x01
        (Side.CLIENT, b"\x05\x01\x02", "bool"),
        (Side.RELAY, b"\x05\x01\x02", "bool"),
        (Side.RELAY, b"\x05\x01\x00\x02", "bool"),
        (Side.RELAY, b"\x0a\x00\xff", "bool"),
        # magic of the wrong side, or garbled
        (Side.CLIENT, Accept().encode() + b"\x00", "magic"),
        (Side.RELAY, b"\x00\x11iris-client-magic\x0bv1.0-draft2", "magic"),
        (Side.CLIENT, b"\x00\x11iris-client-magiX\x0bv1.0-draft2\x00", "magic"),
        (Side.RELAY, b"\x01\x04nope\x00", "magic"),
        # opcodes outside the table
        (Side.CLIENT, b"\x0e", "opcode"),
        (Side.RELAY, b"\xff", "opcode"),
        # strings must be UTF-8
        (Side.CLIENT, b"\x06\x02\xff\xfe", "UTF-8"),
        (Side.RELAY, b"\x08\x01\xc3\x00", "UTF-8"),
        # opcodes that one side never sends
        (Side.CLIENT, Deny("no").encode(), "DENY"),
        (Side.RELAY, Subscribe("news").encode(), "SUBSCRIBE"),
        (Side.RELAY, Unsubscribe("news").encode(), "UNSUBSCRIBE"),
    ],
)
def test_violations(side, data, match):
    # Whole, byte by byte, and behind a valid packet: the same error each way.
    with pytest.raises(ProtocolError, match=match):
        Decoder(side).feed(data)
    decoder = Decoder(side)
    with pytest.raises(ProtocolError, match=match):
        for i in range(len(data)):
            decoder.feed(data[i : i + 1])
    with pytest.raises(ProtocolError, match=match):
        Decoder(side).feed(TunnelAllow(1, 1).encode() + data)


def test_ten_octet_varint_is_accepted():
    wire = b"\x0d" + b"\xff" * 9 + b"\x01"
    same(decode(Side.CLIENT, wire), [TunnelClose(2**64 - 1)])
