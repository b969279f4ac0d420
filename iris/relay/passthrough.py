"""The relay's fast path: requests and replies routed straight from the bytes read.

Request/reply is nearly all of a relay's traffic, and decoding each packet
into an object only to write most of its bytes out again was most of the
relay's work per round trip. For the complete REQUEST packets (to a
registered cluster) and successful REPLY packets at the start of what was
read, this module finds the few fields the router needs (ids, the cluster
name, the timeout) and hands it the rest of the packet as a memoryview slice
of the read, which the delivery carries unchanged: the request from its
length on, the reply from its success flag on. The requester's id for a
request is kept as the bytes it came in, to go back in the reply as they are.

Anything else ends the fast path where it is, and the codec's decoder takes
the rest: another packet type, a request to a cluster the relay's
permissions have not yet cleared this connection to send to (the router
decides, and clears it for the next one: permissions.py), a fault reply (the
codec checks its text is UTF-8), an incomplete packet, a cluster with no
member or a name of 128 bytes or more, an overlong varint, a forwarded
varint that is not minimal (the codec would re-encode it), a length over the
limit. So every error is still the codec's, and a packet the fast path takes
is one the codec decodes to the same values, with the same bytes delivered
(test_relay_passthrough.py checks that against the codec).
"""

from __future__ import annotations

from .. import codec
from .router import Peer, Router

_REQUEST = int(codec.Op.REQUEST)
_REPLY = int(codec.Op.REPLY)
_SUCCESS = 1


class NotFast(Exception):
    """The packet is valid or not, but the codec must decide: stop here."""


def route_leading(router: Router, peer: Peer, data: bytes, max_message: int) -> int:
    """Route the run of fast-path packets at the start of ``data`` from the
    attached ``peer``; return how many bytes they took."""
    view, end, pos, routed = memoryview(data), len(data), 0, 0
    cluster, route_request, route_reply = router.cluster, router.route_request, router.route_reply
    cleared = peer.cleared  # None: no permissions to check
    while pos < end:
        op = data[pos]
        try:
            if op == _REQUEST:
                _, at = read_minimal_varint(data, pos + 1)
                client_id = data[pos + 1 : at]
                size = data[at]
                at += 1
                if size >= 0x80 or at + size > end:
                    break
                name = data[at : at + size]
                if cleared is not None and name not in cleared:
                    break  # not yet decided for this connection: the router decides
                group = cluster(name)
                if group is None:
                    break
                body = at + size
                length, at = read_minimal_varint(data, body)
                at += length
                if length > max_message or at >= end:
                    break
                timeout_ms, at = read_minimal_varint(data, at)
            elif op == _REPLY:
                reply_id, answer = read_varint(data, pos + 1)
                if data[answer] != _SUCCESS:
                    break
                length, at = read_minimal_varint(data, answer + 1)
                at += length
                if length > max_message or at > end:
                    break
            else:
                break
        except (IndexError, NotFast):  # incomplete, or for the codec to judge
            break
        # Outside the try: an IndexError of the router's is not an incomplete packet.
        if op == _REQUEST:
            route_request(peer, client_id, group, timeout_ms, (view[body:at],))
        else:
            route_reply(peer, reply_id, (view[answer:at],))
        pos = at
        routed += 1
    router.fast_packets += routed
    return pos


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; IndexError if it is
    incomplete, NotFast if it is longer than the codec allows. Shared with
    irishost's supervisor, which routes requests from the bytes too."""
    octet = data[pos]
    if octet < 0x80:
        return octet, pos + 1
    # Two and three octets, unrolled: the ids, lengths and timeouts of a busy
    # connection are these, and the loop below costs twice as much.
    second = data[pos + 1]
    if second < 0x80:
        return octet & 0x7F | second << 7, pos + 2
    third = data[pos + 2]
    if third < 0x80:
        return octet & 0x7F | (second & 0x7F) << 7 | third << 14, pos + 3
    value, shift = octet & 0x7F | (second & 0x7F) << 7 | (third & 0x7F) << 14, 21
    for pos in range(pos + 3, pos + codec.MAX_VARINT_OCTETS):  # noqa: B020
        octet = data[pos]
        value |= (octet & 0x7F) << shift
        if octet < 0x80:
            return value, pos + 1
        shift += 7
    raise NotFast


def read_minimal_varint(data: bytes, pos: int) -> tuple[int, int]:
    """As read_varint, for a varint forwarded as it is: NotFast unless minimally
    encoded (no trailing zero octet), so the bytes are those the codec writes."""
    octet = data[pos]
    if octet < 0x80:
        return octet, pos + 1
    value, after = read_varint(data, pos)
    if data[after - 1] == 0:
        raise NotFast
    return value, after
