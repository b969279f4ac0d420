"""What the relay does with packets: the semantics of docs/protocol.md section 6.

The router knows nothing of sockets. Each attached connection is a Peer with
``send(bytes)`` and ``close(reason)``; the server feeds the router decoded
packets and calls :meth:`Router.expire` when a deadline may have passed.

Request and tunnel-build deadlines sit in one heap with lazy deletion: an
entry whose request was already answered is skipped when it surfaces (and
compacted away in bulk). A peer that leaves takes its own pending requests
with it; requests it was serving stay until their deadline answers their
callers with a timeout, so leaving costs O(own state), not a scan of all
requests.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from .. import codec
from .permissions import Action, Gate, User

log = logging.getLogger("iris.relay")

# Largest tunnel chunk, as the original relay.
CHUNK_LIMIT = 64 * 1024
# Deadline entries beyond twice the pending ones tolerated before compacting.
COMPACT_SLACK = 4096
# The relay's buffer for each tunnel direction, granted to the sender.
TUNNEL_ALLOWANCE = 4 * 1024 * 1024

# The relay's REQUEST and REPLY deliveries are most of its output, so they are
# built from these precomputed heads instead of packet objects; the bytes are
# those of codec.RequestDelivery and codec.ReplyDelivery (test_router.py checks).
_REQUEST_HEAD = bytes((codec.Op.REQUEST,))
_REPLY_HEAD = bytes((codec.Op.REPLY,))
_FALSE, _TRUE = b"\x00", b"\x01"
# The codec's encoder already builds keys, lengths and timeouts of up to three
# octets inline, which is what the relay's request keys take for their first
# two million.
_varint = codec.encode_varint


class Peer(Protocol):
    """The router's view of one connection; see server.PeerConnection."""

    name: str
    cluster: str | None  # None until INIT; "" for a plain client
    closed: bool
    outstanding: int  # requests delivered to this member and not yet answered
    requests: set[int]  # the relay's keys of its own requests still pending
    topics: set[str]
    tunnels: dict[int, TunnelEnd]
    # Kept by the Gate (permissions.py) when the relay has permissions; else None.
    user: User | None
    cleared: set[bytes] | None
    cleared_topics: set[str] | None

    def send(self, data: bytes) -> None: ...

    def close(self, reason: str | None) -> None: ...


class ProtocolViolation(Exception):
    """A peer broke a rule of the protocol above the byte level."""


class _Cluster:
    __slots__ = ("members", "cursor")

    def __init__(self) -> None:
        self.members: list[Peer] = []
        self.cursor = 0  # round-robin start among equally loaded members

    def pick(self) -> Peer:
        """The member with the fewest outstanding requests, round-robin among ties."""
        members, n = self.members, len(self.members)
        if n == 1:
            return members[0]
        best_index, best_load = 0, None
        for step in range(n):
            index = (self.cursor + step) % n
            load = members[index].outstanding
            if best_load is None or load < best_load:
                best_index, best_load = index, load
                if load == 0:
                    break
        self.cursor = (best_index + 1) % n
        return members[best_index]


# A request waiting for its answer: (requester, the requester's id for it as
# a varint, the member it was delivered to or None). A tuple: one is made per
# request.
_PendingRequest = tuple[Peer, bytes, "Peer | None"]


class _PendingBuild:
    __slots__ = ("initiator", "tunnel_id", "member")

    def __init__(self, initiator: Peer, tunnel_id: int, member: Peer | None) -> None:
        self.initiator = initiator
        self.tunnel_id = tunnel_id
        self.member = member


class TunnelEnd:
    """One side of a tunnel, as the relay sees it."""

    __slots__ = ("peer", "id", "allowance", "credit", "queue", "other")

    # The tunnel's opposite end. Not set here: the two ends refer to each
    # other, so Router._on_tunnel_confirm links them once both exist, before
    # either is used.
    other: TunnelEnd

    def __init__(self, peer: Peer, tid: int) -> None:
        self.peer = peer
        self.id = tid  # the peer's own id for the tunnel
        self.allowance = 0  # bytes the peer lets us deliver to it
        self.credit = TUNNEL_ALLOWANCE  # bytes we let the peer send us
        self.queue: deque[tuple[int, bytes]] = deque()  # chunks waiting for allowance


class Router:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, gate: Gate | None = None
    ) -> None:
        """``gate``: the permissions in force; None lets every connection do anything."""
        self._clock = clock
        self.gate = gate
        # Keyed by the name's UTF-8 bytes, as requests carry it on the wire.
        self._clusters: dict[bytes, _Cluster] = {}
        self._topics: dict[str, dict[Peer, None]] = {}  # insertion-ordered sets
        self._requests: dict[int, _PendingRequest] = {}
        self._builds: dict[int, _PendingBuild] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._ids = itertools.count()
        # Packets passthrough.py routed without decoding, for the status socket.
        self.fast_packets = 0
        # Each handler takes the packet type it is keyed by.
        self._handlers: dict[type[codec.ClientPacket], Callable[[Peer, Any], None]] = {
            codec.RequestPacket: self._on_request,
            codec.ReplyPacket: self._on_reply,
            codec.BroadcastPacket: self._on_broadcast,
            codec.Publish: self._on_publish,
            codec.Subscribe: self._on_subscribe,
            codec.Unsubscribe: self._on_unsubscribe,
            codec.TunnelInit: self._on_tunnel_init,
            codec.TunnelConfirm: self._on_tunnel_confirm,
            codec.TunnelAllow: self._on_tunnel_allow,
            codec.TunnelTransfer: self._on_tunnel_transfer,
            codec.TunnelClose: self._on_tunnel_close,
        }

    # -- connection life cycle -------------------------------------------------

    def handle(self, peer: Peer, packet: codec.ClientPacket) -> None:
        """Act on one packet from ``peer``; raises ProtocolViolation."""
        if peer.cluster is None:
            self._on_init(peer, packet)
            return
        handler = self._handlers.get(type(packet))
        if handler is None:
            if isinstance(packet, codec.Close):
                self.detach(peer)
                peer.close("")
                return
            raise ProtocolViolation(f"unexpected {type(packet).__name__} after the handshake")
        handler(peer, packet)

    def _on_init(self, peer: Peer, packet: codec.ClientPacket) -> None:
        if not isinstance(packet, codec.Init):
            raise ProtocolViolation(f"expected INIT, got {type(packet).__name__}")
        if packet.version != codec.VERSION:
            reason = (
                f"protocol version mismatch: relay speaks {codec.VERSION}, "
                f"client speaks {packet.version}"
            )
            log.info("denied %s: %s", peer.name, reason)
            self._deny(peer, reason)
            return
        if packet.cluster and self.gate is not None:
            refused = self.gate.refusal(peer, Action.SERVE, packet.cluster)
            if refused is not None:
                self._deny(peer, refused)
                return
        peer.cluster = packet.cluster
        if packet.cluster:
            self._clusters.setdefault(packet.cluster.encode(), _Cluster()).members.append(peer)
        peer.send(codec.Accept().encode())
        log.info("attached %s cluster=%s", peer.name, packet.cluster or "-")

    @staticmethod
    def _deny(peer: Peer, reason: str) -> None:
        peer.send(codec.Deny(reason).encode())
        peer.close(None)

    def detach(self, peer: Peer) -> None:
        """Stop routing to ``peer`` and close its tunnels; idempotent."""
        if peer.closed:
            return
        peer.closed = True
        if peer.cluster:
            name = peer.cluster.encode()
            cluster = self._clusters[name]
            cluster.members.remove(peer)
            if not cluster.members:
                del self._clusters[name]
        for topic in peer.topics:
            self._unsubscribe(peer, topic)
        for key in peer.requests:  # nobody is left to answer
            _, _, member = self._requests.pop(key)
            if member is not None:
                member.outstanding -= 1
        peer.requests.clear()
        # A copy: a tunnel to the peer's own cluster has both ends in this dict.
        for end in list(peer.tunnels.values()):
            self._close_end(end.other, "remote end disconnected")
        peer.tunnels.clear()
        if peer.cluster is not None:
            log.info("detached %s", peer.name)

    # -- deadlines ----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def expire(self) -> None:
        """Answer every request and tunnel build whose deadline has passed."""
        now, deadlines = self._clock(), self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, key = heapq.heappop(deadlines)
            pending = self._requests.pop(key, None)
            if pending is not None:
                requester, client_id, member = pending
                if member is not None:
                    member.outstanding -= 1
                requester.requests.discard(key)
                requester.send(b"".join((_REPLY_HEAD, client_id, _TRUE)))
                continue
            build = self._builds.pop(key, None)
            if build is not None and not build.initiator.closed:
                build.initiator.send(codec.TunnelResult(build.tunnel_id, True).encode())

    def _schedule(self, timeout_ms: int) -> int:
        live = len(self._requests) + len(self._builds)
        if len(self._deadlines) > 2 * live + COMPACT_SLACK:
            self._compact()
        key = next(self._ids)
        heapq.heappush(self._deadlines, (self._clock() + timeout_ms / 1000, key))
        return key

    def _compact(self) -> None:
        """Drop the entries of answered requests from the deadline heap.

        Answered entries are otherwise only dropped when their deadline comes,
        so the heap would hold rate x timeout entries: at 20k requests/s with
        one-hour timeouts, 72 million. Rebuilding whenever it is over twice
        the live entries keeps it proportional to what is pending, at an
        amortized cost of O(1) per request.
        """
        pending = self._requests.keys() | self._builds.keys()
        self._deadlines = [entry for entry in self._deadlines if entry[1] in pending]
        heapq.heapify(self._deadlines)

    def census(self) -> tuple[dict[str, int], dict[str, int], int]:
        """Members per cluster, subscribers per topic, and pending requests."""
        clusters = {name.decode(): len(group.members) for name, group in self._clusters.items()}
        topics = {topic: len(subscribers) for topic, subscribers in self._topics.items()}
        return clusters, topics, len(self._requests)

    def _member(self, cluster: str) -> Peer | None:
        group = self._clusters.get(cluster.encode())
        return group.pick() if group else None

    def cluster(self, name: bytes) -> _Cluster | None:
        """The members registered under the UTF-8 bytes ``name``, if any."""
        return self._clusters.get(name)

    # -- request/reply -----------------------------------------------------------------

    def _on_request(self, peer: Peer, packet: codec.RequestPacket) -> None:
        client_id, cluster, request, timeout_ms = packet
        if self.gate is not None and not self.gate.may_send(peer, cluster):
            return
        body = (_varint(len(request)), request, _varint(timeout_ms))
        group = self._clusters.get(cluster.encode())
        self.route_request(peer, _varint(client_id), group, timeout_ms, body)

    def route_request(
        self,
        peer: Peer,
        client_id: bytes,
        group: _Cluster | None,
        timeout_ms: int,
        body: tuple[bytes | memoryview, ...],
    ) -> None:
        """Deliver a request to the least loaded member of ``group``, if any,
        and keep it until answered or timed out.

        ``client_id`` is the requester's id for it, as a varint: the answer
        carries it back as it is.
        ``body`` is the request's wire form from its length on (length,
        request, timeout), in pieces, which the delivery carries as they are.
        """
        key = self._schedule(timeout_ms)
        member = group.pick() if group else None
        self._requests[key] = (peer, client_id, member)
        peer.requests.add(key)
        if member is not None:
            member.outstanding += 1
            member.send(b"".join((_REQUEST_HEAD, _varint(key), *body)))

    def _on_reply(self, peer: Peer, packet: codec.ReplyPacket) -> None:
        reply_id, success, payload = packet
        self.route_reply(peer, reply_id, codec.encode_answer(success, payload, "strict"))

    def route_reply(
        self, peer: Peer, reply_id: int, answer: tuple[bytes | memoryview, ...]
    ) -> None:
        """Pass a member's answer to the request's requester.

        ``answer`` is the reply's wire form from its success flag on (flag,
        then payload or fault text), in pieces, carried as they are.
        """
        pending = self._requests.pop(reply_id, None)
        if pending is None:
            return  # expired: ignored, not a violation
        requester, client_id, member = pending
        if member is not peer:  # never issued to this member: ignored too
            self._requests[reply_id] = pending
            return
        peer.outstanding -= 1
        requester.requests.discard(reply_id)
        requester.send(b"".join((_REPLY_HEAD, client_id, _FALSE, *answer)))

    # -- broadcast and publish/subscribe ---------------------------------------------

    def _on_broadcast(self, peer: Peer, packet: codec.BroadcastPacket) -> None:
        if self.gate is not None and not self.gate.may_send(peer, packet.cluster):
            return
        group = self._clusters.get(packet.cluster.encode())
        if group:
            data = codec.BroadcastDelivery(packet.message).encode()
            for member in group.members:
                member.send(data)

    def _on_subscribe(self, peer: Peer, packet: codec.Subscribe) -> None:
        if self.gate is not None and not self.gate.may_subscribe(peer, packet.topic):
            return
        peer.topics.add(packet.topic)
        self._topics.setdefault(packet.topic, {})[peer] = None

    def _on_unsubscribe(self, peer: Peer, packet: codec.Unsubscribe) -> None:
        if packet.topic in peer.topics:
            peer.topics.discard(packet.topic)
            self._unsubscribe(peer, packet.topic)

    def _unsubscribe(self, peer: Peer, topic: str) -> None:
        subscribers = self._topics[topic]
        del subscribers[peer]
        if not subscribers:
            del self._topics[topic]

    def _on_publish(self, peer: Peer, packet: codec.Publish) -> None:
        if self.gate is not None and not self.gate.may_publish(peer, packet.topic):
            return
        subscribers = self._topics.get(packet.topic)
        if subscribers:
            data = packet.encode()  # the delivery has the publish packet's format
            for subscriber in subscribers:
                subscriber.send(data)

    # -- tunnels ----------------------------------------------------------------------

    def _on_tunnel_init(self, peer: Peer, packet: codec.TunnelInit) -> None:
        if packet.id in peer.tunnels:
            raise ProtocolViolation(f"tunnel id {packet.id} is already open")
        if self.gate is not None and not self.gate.may_send(peer, packet.cluster):
            return
        key = self._schedule(packet.timeout_ms)
        member = self._member(packet.cluster)
        self._builds[key] = _PendingBuild(peer, packet.id, member)
        if member is not None:
            member.send(codec.TunnelOffer(key, CHUNK_LIMIT).encode())

    def _on_tunnel_confirm(self, peer: Peer, packet: codec.TunnelConfirm) -> None:
        if packet.id in peer.tunnels:
            raise ProtocolViolation(f"tunnel id {packet.id} is already open")
        build = self._builds.get(packet.build_id)
        if build is None or build.member is not peer or build.initiator.closed:
            # Too late (or not ours): the member's fresh tunnel has no other end.
            peer.send(codec.TunnelClosed(packet.id, "tunnel build expired").encode())
            return
        del self._builds[packet.build_id]
        initiator = build.initiator
        near, far = TunnelEnd(initiator, build.tunnel_id), TunnelEnd(peer, packet.id)
        near.other, far.other = far, near
        initiator.tunnels[near.id] = near
        peer.tunnels[far.id] = far
        peer.send(codec.TunnelAllow(far.id, TUNNEL_ALLOWANCE).encode())
        initiator.send(
            codec.TunnelResult(near.id, False, CHUNK_LIMIT).encode()
            + codec.TunnelAllow(near.id, TUNNEL_ALLOWANCE).encode()
        )

    def _on_tunnel_allow(self, peer: Peer, packet: codec.TunnelAllow) -> None:
        end = peer.tunnels.get(packet.id)
        if end is not None:  # else closed meanwhile
            end.allowance += packet.size
            self._pump(end)

    def _on_tunnel_transfer(self, peer: Peer, packet: codec.TunnelTransfer) -> None:
        end = peer.tunnels.get(packet.id)
        if end is None:
            return  # closed while the chunk was in flight
        size = len(packet.chunk)
        if size > CHUNK_LIMIT:
            raise ProtocolViolation(f"tunnel chunk of {size} bytes exceeds {CHUNK_LIMIT}")
        if size > end.credit:
            raise ProtocolViolation(f"tunnel {packet.id} sent {size} bytes over its allowance")
        if packet.size and packet.size < size:
            raise ProtocolViolation(f"tunnel chunk longer than its message ({packet.size})")
        end.credit -= size
        end.other.queue.append((packet.size, packet.chunk))
        self._pump(end.other)

    def _pump(self, end: TunnelEnd) -> None:
        """Forward queued chunks to ``end`` as its allowance permits.

        Like the original relay, allowance is checked only before a message's
        first chunk, so a message that has started always completes.
        """
        queue, freed = end.queue, 0
        while queue:
            size, chunk = queue[0]
            if size and end.allowance < len(chunk):
                break
            queue.popleft()
            end.allowance -= len(chunk)
            freed += len(chunk)
            end.peer.send(codec.TunnelTransfer(end.id, size, chunk).encode())
        if freed:
            source = end.other
            source.credit += freed
            source.peer.send(codec.TunnelAllow(source.id, freed).encode())

    def _on_tunnel_close(self, peer: Peer, packet: codec.TunnelClose) -> None:
        end = peer.tunnels.pop(packet.id, None)
        if end is None:
            return  # the other side closed first; its notice is the answer
        self._close_end(end.other, "")
        peer.send(codec.TunnelClosed(end.id, "").encode())

    @staticmethod
    def _close_end(end: TunnelEnd, reason: str) -> None:
        """Close ``end`` for its peer, after delivering the data queued for it.

        The queued chunks were sent before the close, and order is preserved
        per direction: dropping them would lose messages a sender sent and then
        closed, e.g. a reply written before the receiver had granted allowance.
        They go out regardless of allowance, which a binding must tolerate
        (docs/protocol.md section 6); the relay's buffer bounds them.
        """
        end.peer.tunnels.pop(end.id, None)
        for size, chunk in end.queue:
            end.peer.send(codec.TunnelTransfer(end.id, size, chunk).encode())
        end.queue.clear()
        end.peer.send(codec.TunnelClosed(end.id, reason).encode())
