"""The relay's fast path for requests and replies is the codec by other means.

passthrough.route_leading routes the leading requests and successful replies
of a read straight from its bytes, and leaves the rest to the codec. So the
relay must act as it would with the codec alone had the read ended where the
fast path stopped: fed the same stream, a router behind the fast path and one
behind the codec alone (fed those two pieces) send every peer the same bytes
and fail with the same error. And the fast path must take the common packets,
or it would be dead code.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_router import attach

from iris import codec
from iris.codec import Publish, ReplyPacket, RequestPacket, Subscribe
from iris.relay.passthrough import route_leading
from iris.relay.router import Router

MAX_MESSAGE = 1 << 20
LONG_NAME = "é" * 70  # 140 bytes: its length needs a two-octet varint


def run(stream: bytes, fast_until: int | None) -> tuple[int, list[bytes], str]:
    """Feed ``stream`` from a peer that is the only member of "echo" (its
    requests to echo come back to it, its replies answer them); other peers
    are members of other clusters. With ``fast_until`` None the fast path
    takes what it can first; else the codec alone is fed the stream in two
    pieces, split there. Returns where the split was, what each peer was
    sent, and the error if one was raised."""
    router = Router(clock=lambda: 0.0)
    peer = attach(router, "echo")
    others = [attach(router, LONG_NAME), attach(router, "ec")]  # "ec": a prefix of "echo"
    decoder = codec.Decoder(codec.Side.CLIENT, MAX_MESSAGE)
    split, error = fast_until, ""
    try:
        if split is None:
            split = route_leading(router, peer, stream, MAX_MESSAGE)
        else:
            for packet in decoder.feed(stream[:split]):
                router.handle(peer, packet)
        for packet in decoder.feed(stream[split:]):
            router.handle(peer, packet)
    except codec.ProtocolError as err:
        error = str(err)
    return split, [b"".join(each.sent) for each in (peer, *others)], error


def assert_same(stream: bytes) -> None:
    fast = run(stream, None)
    assert fast == run(stream, fast[0])


ids = st.integers(0, 2**40)
small_ids = st.integers(0, 6)  # replies to the requests of the same stream
payloads = st.binary(max_size=300)
clusters = st.sampled_from(["echo", "ec", "nobody", "", LONG_NAME])
packets = st.one_of(
    st.builds(RequestPacket, ids, clusters, payloads, st.integers(0, 2**35)),
    st.builds(ReplyPacket, small_ids, st.just(True), payloads),
    st.builds(ReplyPacket, small_ids, st.just(False), st.text(max_size=20)),
    st.builds(ReplyPacket, ids, st.just(True), payloads),  # mostly to keys never issued
    st.builds(Subscribe, st.just("t")),
    st.builds(Publish, st.just("t"), payloads),
)
# Byte sequences the codec judges, not the fast path: non-minimal and
# overlong varints, a bad bool, a length over the limit.
odd_bytes = st.sampled_from(
    [
        b"\x05\x00\x01\x81\x00x",  # reply, payload length 1 written in two octets
        b"\x04\x00\x04echo\x01x\x85\x00",  # request, timeout 5 written in two octets
        b"\x04\x00\x04echo\x80\x00\x00",  # request, length 0 written in two octets
        b"\x05" + b"\x80" * 11,  # reply id longer than a varint may be
        b"\x05\x00\x02",  # a bool that is neither 0 nor 1
        b"\x04\x00\x04echo" + codec.encode_varint(MAX_MESSAGE + 1),
        b"\x05\x00\x00\x02\xff\xfe",  # a fault text that is not UTF-8
    ]
)


@settings(max_examples=300)
@given(
    st.lists(st.one_of(packets.map(lambda packet: packet.encode()), odd_bytes), max_size=12),
    st.integers(0, 40),
)
def test_fast_path_and_codec_route_alike(parts, cut):
    """Whole streams, and streams cut short (a packet left incomplete)."""
    stream = b"".join(parts)
    assert_same(stream)
    assert_same(stream[: max(0, len(stream) - cut)])


def test_fast_path_takes_requests_and_successful_replies():
    stream = b"".join(
        [RequestPacket(i, "echo", bytes(i * 100), 10_000).encode() for i in range(5)]
        + [ReplyPacket(i, True, bytes(i * 100)).encode() for i in range(5)]
    )
    router = Router()
    peer = attach(router, "echo")
    assert route_leading(router, peer, stream, MAX_MESSAGE) == len(stream)
    assert peer.outstanding == 0 and not peer.requests


@pytest.mark.parametrize(
    "packet",
    [
        RequestPacket(1, "nobody", b"x", 10),  # no member: the codec path keeps it pending
        ReplyPacket(0, False, "fault"),
        Publish("t", b"x"),
    ],
)
def test_fast_path_leaves_other_packets_to_the_codec(packet):
    router = Router()
    peer = attach(router, "echo")
    stream = RequestPacket(0, "echo", b"x", 10).encode() + packet.encode()
    assert route_leading(router, peer, stream, MAX_MESSAGE) == len(stream) - len(packet.encode())
