"""The relay's routing state, driven directly: bounded bookkeeping under load."""

import itertools

import pytest

from iris import codec
from iris.relay.router import COMPACT_SLACK, Router


class Peer:
    """A connection as the router sees it, collecting what it is sent."""

    def __init__(self):
        self.name = "peer"
        self.cluster = None
        self.closed = False
        self.outstanding = 0
        self.requests = set()
        self.topics = set()
        self.tunnels = {}
        self.user = self.cleared = self.cleared_topics = None  # no permissions
        self.sent = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self, reason) -> None:
        self.closed = True


def attach(router: Router, cluster: str) -> Peer:
    peer = Peer()
    router.handle(peer, codec.Init(cluster))
    return peer


def test_answered_requests_do_not_accumulate_in_the_deadline_heap():
    router = Router()
    member, client = attach(router, "echo"), attach(router, "")
    decoder = codec.Decoder(codec.Side.RELAY)
    for rid in range(10 * COMPACT_SLACK):
        router.handle(client, codec.RequestPacket(rid, "echo", b"x", 3_600_000))  # one hour
        (delivery,) = decoder.feed(member.sent.pop())
        router.handle(member, codec.ReplyPacket(delivery.id, True, b"y"))
    assert len(router._requests) == 0
    assert len(router._deadlines) <= COMPACT_SLACK + 1
    replies = codec.Decoder(codec.Side.RELAY).feed(b"".join(client.sent[1:]))
    assert len(replies) == 10 * COMPACT_SLACK
    assert all(reply.success and reply.payload == b"y" for reply in replies)


def test_pending_requests_survive_compaction_and_still_time_out():
    now = [0.0]
    router = Router(clock=lambda: now[0])
    member, client = attach(router, "echo"), attach(router, "")
    decoder = codec.Decoder(codec.Side.RELAY)
    router.handle(client, codec.RequestPacket(0, "echo", b"unanswered", 1000))
    decoder.feed(member.sent.pop())
    for rid in range(1, 4 * COMPACT_SLACK):
        router.handle(client, codec.RequestPacket(rid, "echo", b"x", 1000))
        (delivery,) = decoder.feed(member.sent.pop())
        router.handle(member, codec.ReplyPacket(delivery.id, True, b"y"))
    client.sent.clear()
    now[0] = 1.0
    router.expire()
    (timed_out,) = codec.Decoder(codec.Side.RELAY).feed(b"".join(client.sent))
    assert timed_out == codec.ReplyDelivery(0, True)


def test_a_departed_requester_takes_its_pending_requests_with_it():
    router = Router()
    member, client = attach(router, "echo"), attach(router, "")
    for rid in range(100):
        router.handle(client, codec.RequestPacket(rid, "echo", b"x", 3_600_000))
    assert member.outstanding == 100
    router.detach(client)
    assert len(router._requests) == 0
    assert member.outstanding == 0  # the member is not left looking busy
    router.handle(member, codec.ReplyPacket(0, True, b"late"))  # ignored, not an error


@pytest.mark.parametrize("number", [0, 127, 128, 16383, 16384, 2**21, 2**35])
@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 300])
def test_request_and_reply_deliveries_are_the_codecs_bytes(number, payload):
    """The router builds its REQUEST and REPLY deliveries from precomputed
    heads, not packet objects; the bytes must be the codec's all the same,
    for every varint length and payload size."""
    router = Router()
    router._ids = itertools.count(number)  # the relay's own request keys
    member, client = attach(router, "echo"), attach(router, "")
    member.sent.clear()
    client.sent.clear()
    router.handle(client, codec.RequestPacket(number, "echo", payload, number))
    assert member.sent == [codec.RequestDelivery(number, payload, number).encode()]
    router.handle(member, codec.ReplyPacket(number, True, payload))
    assert client.sent == [codec.ReplyDelivery(number, False, True, payload).encode()]
    fault = "fault: ünïcode " + payload.hex()
    router.handle(client, codec.RequestPacket(number + 1, "echo", payload, 5))
    router.handle(member, codec.ReplyPacket(number + 1, False, fault))
    assert client.sent[1] == codec.ReplyDelivery(number + 1, False, False, fault).encode()
