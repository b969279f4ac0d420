"""The Iris relay wire protocol (docs/protocol.md), pure: no sockets, no threads.

Bytes go into a :class:`Decoder` and packets come out; a packet's ``encode()``
gives the bytes to send. The client binding and the embedded relay both drive
this one module, so the two can never disagree about the wire.

Packets are NamedTuples (cheap to build on the hot path), each with its
writer (``encode``) and its reader (``read``) side by side, so a format is
written down once. The two directions share an opcode space but not all
formats, hence two packet families, :data:`ClientPacket` (decoded by the
relay) and :data:`RelayPacket` (decoded by a client), and one reader table
per direction (:data:`CLIENT_READERS`, :data:`RELAY_READERS`). A decoder is
told which side it listens to.

Two error kinds: a peer breaking the protocol raises :class:`ProtocolError`;
our own caller's mistakes are ``ValueError`` and are caught by the binding
before anything is encoded.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Generic, Literal, NamedTuple, TypeVar, cast, overload

VERSION = "v1.0-draft2"
CLIENT_MAGIC = "iris-client-magic"
RELAY_MAGIC = "iris-relay-magic"

# The largest message (request, reply, broadcast, event, tunnel chunk) a
# decoder accepts. Both the original relay and this one refuse bigger ones, and
# the bound keeps a hostile length field from becoming an allocation.
MAX_MESSAGE = 64 * 1024 * 1024


def too_large(what: str, size: int) -> str:
    """The error for a ``what`` (say "request") of ``size`` bytes over MAX_MESSAGE.

    Senders check sizes before encoding: sent anyway, such a message is a
    protocol violation, for which the relay drops the whole connection and
    everything in flight on it.
    """
    return f"{what} of {size} bytes exceeds the relay's message limit of {MAX_MESSAGE} bytes"


# A 64-bit value needs at most 10 base-128 groups; more is a violation.
MAX_VARINT_OCTETS = 10

# The shortest timeout a binding sends, in seconds: the wire carries whole
# milliseconds.
MIN_TIMEOUT = 0.001
# The longest, in seconds (about 31 years). The varint carries 64 bits of
# milliseconds, but the Iris node holds a timeout as Go's time.Duration (int64
# nanoseconds, about 292 years) and threading's waits stop at the same
# TIMEOUT_MAX; a round figure well inside all of them.
MAX_TIMEOUT = 1e9

# Room in one packet for everything besides its message: the opcode, ids,
# lengths and names. Each binary field is bounded by max_message on its own,
# so without a bound on the whole a packet with a name and a message each at
# the limit would make a decoder buffer twice max_message. Real names are a
# few dozen bytes; this is generous.
PACKET_OVERHEAD = 64 * 1024


class ProtocolError(Exception):
    """The peer sent bytes that break the wire protocol."""


class Op(enum.IntEnum):
    INIT = 0x00
    DENY = 0x01
    CLOSE = 0x02
    BROADCAST = 0x03
    REQUEST = 0x04
    REPLY = 0x05
    SUBSCRIBE = 0x06
    UNSUBSCRIBE = 0x07
    PUBLISH = 0x08
    TUN_INIT = 0x09
    TUN_CONFIRM = 0x0A
    TUN_ALLOW = 0x0B
    TUN_TRANSFER = 0x0C
    TUN_CLOSE = 0x0D


class Side(enum.Enum):
    """Which end of the connection sent the bytes a decoder reads."""

    CLIENT = "client"
    RELAY = "relay"


# ---------------------------------------------------------------------------
# Field encoders. Each returns bytes; packets join them in one copy.

_SMALL_VARINTS = [bytes((i,)) for i in range(128)]
_OPS = [bytes((op,)) for op in Op]
_FALSE, _TRUE = b"\x00", b"\x01"


def encode_varint(value: int) -> bytes:
    if value < 0x80:
        if value < 0:
            raise ValueError(f"varint must be non-negative, got {value}")
        return _SMALL_VARINTS[value]
    # Ids, lengths and timeouts in milliseconds mostly take two or three
    # octets; one bytes() call builds them for a third of the loop's cost.
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    if value < 0x200000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(text: str) -> tuple[bytes, bytes]:
    data = text.encode()
    return encode_varint(len(data)), data


def encode_answer(success: bool, payload: bytes | str, errors: str) -> tuple[bytes, bytes, bytes]:
    """A reply's wire form from its success flag on: the flag, then the
    payload on success or else the fault text, encoded with ``errors``.

    Shared by ReplyPacket, ReplyDelivery and the relay's router, which passes it
    on after its own head."""
    # The payload's type follows ``success``; cast, not checked: this is per reply.
    if success:
        data = cast(bytes, payload)
        return _TRUE, encode_varint(len(data)), data
    data = cast(str, payload).encode("utf-8", errors)
    return _FALSE, encode_varint(len(data)), data


# ---------------------------------------------------------------------------
# Field readers: each returns (value, next position) or raises _Incomplete.


class _Incomplete(Exception):
    """More bytes are needed; ``need`` is the buffer length that may suffice."""

    def __init__(self, need: int):
        self.need = need


class _Reader:
    """Field readers over one buffer; each returns (value, next position)."""

    __slots__ = ("buf", "max_message", "limit")

    def __init__(self, buf: bytearray, max_message: int):
        self.buf = buf
        self.max_message = max_message
        self.limit = 0  # buffer position the current packet may not extend past

    def varint(self, pos: int) -> tuple[int, int]:
        buf = self.buf
        octet = buf[pos]
        if octet < 0x80:
            return octet, pos + 1
        value, shift = octet & 0x7F, 7
        for pos in range(pos + 1, pos + MAX_VARINT_OCTETS):  # noqa: B020
            octet = buf[pos]
            value |= (octet & 0x7F) << shift
            if octet < 0x80:
                return value, pos + 1
            shift += 7
        raise ProtocolError(f"varint longer than {MAX_VARINT_OCTETS} octets")

    def binary(self, pos: int) -> tuple[bytes, int]:
        size, pos = self.varint(pos)
        if size > self.max_message:
            raise ProtocolError(f"message of {size} bytes exceeds the {self.max_message} limit")
        end = pos + size
        if end > self.limit:
            raise ProtocolError(
                f"packet exceeds the limit of {self.max_message} + {PACKET_OVERHEAD} bytes"
            )
        if end > len(self.buf):
            raise _Incomplete(end)
        return bytes(self.buf[pos:end]), end

    def string(self, pos: int) -> tuple[str, int]:
        data, pos = self.binary(pos)
        try:
            return data.decode(), pos
        except UnicodeDecodeError as err:
            raise ProtocolError(f"string is not UTF-8: {err}") from err

    def bool(self, pos: int) -> tuple[bool, int]:
        octet = self.buf[pos]
        if octet > 1:
            raise ProtocolError(f"bool octet must be 0 or 1, got {octet:#04x}")
        return octet == 1, pos + 1

    def magic(self, pos: int, expected: str) -> int:
        magic, pos = self.string(pos)
        if magic != expected:
            raise ProtocolError(f"bad magic {magic!r}, expected {expected!r}")
        return pos


# ---------------------------------------------------------------------------
# Packets a client sends. The three whose plain names also name an operation
# of the binding and a frame on irishost's ring carry the layer in their name:
# RequestPacket, ReplyPacket, BroadcastPacket (issue 18).


class Init(NamedTuple):
    cluster: str = ""  # empty: a plain client
    version: str = VERSION

    def encode(self) -> bytes:
        return b"".join(
            (_OPS[Op.INIT], *_string(CLIENT_MAGIC), *_string(self.version), *_string(self.cluster))
        )

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[Init, int]:
        pos = r.magic(pos, CLIENT_MAGIC)
        version, pos = r.string(pos)
        cluster, pos = r.string(pos)
        return Init(cluster, version), pos


class Close(NamedTuple):
    def encode(self) -> bytes:
        return _OPS[Op.CLOSE]

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[Close, int]:
        return Close(), pos


class BroadcastPacket(NamedTuple):
    cluster: str
    message: bytes

    def encode(self) -> bytes:
        return b"".join(
            (
                _OPS[Op.BROADCAST],
                *_string(self.cluster),
                encode_varint(len(self.message)),
                self.message,
            )
        )

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[BroadcastPacket, int]:
        cluster, pos = r.string(pos)
        message, pos = r.binary(pos)
        return BroadcastPacket(cluster, message), pos


class RequestPacket(NamedTuple):
    id: int
    cluster: str
    request: bytes
    timeout_ms: int

    def encode(self) -> bytes:
        cluster = self.cluster.encode()
        return b"".join(
            (
                _OPS[Op.REQUEST],
                encode_varint(self.id),
                encode_varint(len(cluster)),
                cluster,
                encode_varint(len(self.request)),
                self.request,
                encode_varint(self.timeout_ms),
            )
        )

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[RequestPacket, int]:
        rid, pos = r.varint(pos)
        cluster, pos = r.string(pos)
        request, pos = r.binary(pos)
        timeout, pos = r.varint(pos)
        return RequestPacket(rid, cluster, request, timeout), pos


class ReplyPacket(NamedTuple):
    id: int
    success: bool
    payload: bytes | str  # the reply's bytes on success, else the fault text

    def encode(self) -> bytes:
        # A handler's fault text: lone surrogates become "?" rather than cost the answer.
        answer = encode_answer(self.success, self.payload, "replace")
        return b"".join((_OPS[Op.REPLY], encode_varint(self.id), *answer))

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[ReplyPacket, int]:
        rid, pos = r.varint(pos)
        success, pos = r.bool(pos)
        payload, pos = r.binary(pos) if success else r.string(pos)
        return ReplyPacket(rid, success, payload), pos


class Subscribe(NamedTuple):
    topic: str

    def encode(self) -> bytes:
        return b"".join((_OPS[Op.SUBSCRIBE], *_string(self.topic)))

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[Subscribe, int]:
        topic, pos = r.string(pos)
        return Subscribe(topic), pos


class Unsubscribe(NamedTuple):
    topic: str

    def encode(self) -> bytes:
        return b"".join((_OPS[Op.UNSUBSCRIBE], *_string(self.topic)))

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[Unsubscribe, int]:
        topic, pos = r.string(pos)
        return Unsubscribe(topic), pos


class Publish(NamedTuple):
    """Same format both ways: a client publishing, or the relay delivering."""

    topic: str
    event: bytes

    def encode(self) -> bytes:
        return b"".join(
            (_OPS[Op.PUBLISH], *_string(self.topic), encode_varint(len(self.event)), self.event)
        )

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[Publish, int]:
        topic, pos = r.string(pos)
        event, pos = r.binary(pos)
        return Publish(topic, event), pos


class TunnelInit(NamedTuple):
    id: int
    cluster: str
    timeout_ms: int

    def encode(self) -> bytes:
        return b"".join(
            (
                _OPS[Op.TUN_INIT],
                encode_varint(self.id),
                *_string(self.cluster),
                encode_varint(self.timeout_ms),
            )
        )

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[TunnelInit, int]:
        tid, pos = r.varint(pos)
        cluster, pos = r.string(pos)
        timeout, pos = r.varint(pos)
        return TunnelInit(tid, cluster, timeout), pos


class TunnelConfirm(NamedTuple):
    build_id: int
    id: int

    def encode(self) -> bytes:
        return b"".join(
            (_OPS[Op.TUN_CONFIRM], encode_varint(self.build_id), encode_varint(self.id))
        )

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[TunnelConfirm, int]:
        build_id, pos = r.varint(pos)
        tid, pos = r.varint(pos)
        return TunnelConfirm(build_id, tid), pos


class TunnelAllow(NamedTuple):
    """Same format both ways."""

    id: int
    size: int

    def encode(self) -> bytes:
        return b"".join((_OPS[Op.TUN_ALLOW], encode_varint(self.id), encode_varint(self.size)))

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[TunnelAllow, int]:
        tid, pos = r.varint(pos)
        size, pos = r.varint(pos)
        return TunnelAllow(tid, size), pos


class TunnelTransfer(NamedTuple):
    """Same format both ways. ``size`` is the whole message's length on its
    first chunk and 0 on continuation chunks."""

    id: int
    size: int
    chunk: bytes

    def encode(self) -> bytes:
        return b"".join(
            (
                _OPS[Op.TUN_TRANSFER],
                encode_varint(self.id),
                encode_varint(self.size),
                encode_varint(len(self.chunk)),
                self.chunk,
            )
        )

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[TunnelTransfer, int]:
        tid, pos = r.varint(pos)
        size, pos = r.varint(pos)
        chunk, pos = r.binary(pos)
        return TunnelTransfer(tid, size, chunk), pos


class TunnelClose(NamedTuple):
    id: int

    def encode(self) -> bytes:
        return b"".join((_OPS[Op.TUN_CLOSE], encode_varint(self.id)))

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[TunnelClose, int]:
        tid, pos = r.varint(pos)
        return TunnelClose(tid), pos


# ---------------------------------------------------------------------------
# Packets a relay sends.


class Accept(NamedTuple):
    """The relay's INIT: the connection is accepted."""

    version: str = VERSION

    def encode(self) -> bytes:
        return b"".join((_OPS[Op.INIT], *_string(RELAY_MAGIC), *_string(self.version)))

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[Accept, int]:
        pos = r.magic(pos, RELAY_MAGIC)
        version, pos = r.string(pos)
        return Accept(version), pos


class Deny(NamedTuple):
    reason: str

    def encode(self) -> bytes:
        return b"".join((_OPS[Op.DENY], *_string(RELAY_MAGIC), *_string(self.reason)))

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[Deny, int]:
        pos = r.magic(pos, RELAY_MAGIC)
        reason, pos = r.string(pos)
        return Deny(reason), pos


class Closed(NamedTuple):
    """The relay's CLOSE; an empty reason acknowledges a graceful close."""

    reason: str = ""

    def encode(self) -> bytes:
        return b"".join((_OPS[Op.CLOSE], *_string(self.reason)))

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[Closed, int]:
        reason, pos = r.string(pos)
        return Closed(reason), pos


class BroadcastDelivery(NamedTuple):
    message: bytes

    def encode(self) -> bytes:
        return b"".join((_OPS[Op.BROADCAST], encode_varint(len(self.message)), self.message))

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[BroadcastDelivery, int]:
        message, pos = r.binary(pos)
        return BroadcastDelivery(message), pos


class RequestDelivery(NamedTuple):
    id: int
    request: bytes
    timeout_ms: int

    def encode(self) -> bytes:
        return b"".join(
            (
                _OPS[Op.REQUEST],
                encode_varint(self.id),
                encode_varint(len(self.request)),
                self.request,
                encode_varint(self.timeout_ms),
            )
        )

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[RequestDelivery, int]:
        rid, pos = r.varint(pos)
        request, pos = r.binary(pos)
        timeout, pos = r.varint(pos)
        return RequestDelivery(rid, request, timeout), pos


class ReplyDelivery(NamedTuple):
    id: int
    timed_out: bool
    success: bool = False
    payload: bytes | str = b""

    def encode(self) -> bytes:
        if self.timed_out:
            return b"".join((_OPS[Op.REPLY], encode_varint(self.id), _TRUE))
        answer = encode_answer(self.success, self.payload, "strict")
        return b"".join((_OPS[Op.REPLY], encode_varint(self.id), _FALSE, *answer))

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[ReplyDelivery, int]:
        rid, pos = r.varint(pos)
        timed_out, pos = r.bool(pos)
        if timed_out:
            return ReplyDelivery(rid, True), pos
        success, pos = r.bool(pos)
        payload, pos = r.binary(pos) if success else r.string(pos)
        return ReplyDelivery(rid, False, success, payload), pos


class TunnelOffer(NamedTuple):
    """The relay's TUN_INIT: a member is asked to accept a tunnel."""

    build_id: int
    chunk_limit: int

    def encode(self) -> bytes:
        return b"".join(
            (_OPS[Op.TUN_INIT], encode_varint(self.build_id), encode_varint(self.chunk_limit))
        )

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[TunnelOffer, int]:
        build_id, pos = r.varint(pos)
        chunk_limit, pos = r.varint(pos)
        return TunnelOffer(build_id, chunk_limit), pos


class TunnelResult(NamedTuple):
    """The relay's TUN_CONFIRM: the outcome of the initiator's TUN_INIT."""

    id: int
    timed_out: bool
    chunk_limit: int = 0

    def encode(self) -> bytes:
        if self.timed_out:
            return b"".join((_OPS[Op.TUN_CONFIRM], encode_varint(self.id), _TRUE))
        return b"".join(
            (_OPS[Op.TUN_CONFIRM], encode_varint(self.id), _FALSE, encode_varint(self.chunk_limit))
        )

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[TunnelResult, int]:
        tid, pos = r.varint(pos)
        timed_out, pos = r.bool(pos)
        if timed_out:
            return TunnelResult(tid, True), pos
        chunk_limit, pos = r.varint(pos)
        return TunnelResult(tid, False, chunk_limit), pos


class TunnelClosed(NamedTuple):
    id: int
    reason: str = ""

    def encode(self) -> bytes:
        return b"".join((_OPS[Op.TUN_CLOSE], encode_varint(self.id), *_string(self.reason)))

    @staticmethod
    def read(r: _Reader, pos: int) -> tuple[TunnelClosed, int]:
        tid, pos = r.varint(pos)
        reason, pos = r.string(pos)
        return TunnelClosed(tid, reason), pos


# ---------------------------------------------------------------------------
# Decoding: one reader table per direction, keyed by opcode. An opcode that a
# side may not send is simply missing from its table.

ClientPacket = (
    Init
    | Close
    | BroadcastPacket
    | RequestPacket
    | ReplyPacket
    | Subscribe
    | Unsubscribe
    | Publish
    | TunnelInit
    | TunnelConfirm
    | TunnelAllow
    | TunnelTransfer
    | TunnelClose
)
RelayPacket = (
    Accept
    | Deny
    | Closed
    | BroadcastDelivery
    | RequestDelivery
    | ReplyDelivery
    | Publish
    | TunnelOffer
    | TunnelResult
    | TunnelAllow
    | TunnelTransfer
    | TunnelClosed
)
_Packet = TypeVar("_Packet", bound=tuple[object, ...])
# A packet type's ``read``: the packet at a position (after its opcode), and
# the position after it.
PacketReader = Callable[[_Reader, int], tuple[_Packet, int]]

# Plain int keys: hashing an IntEnum member per lookup costs several times as much.
CLIENT_READERS: dict[int, PacketReader[ClientPacket]] = {
    int(Op.INIT): Init.read,
    int(Op.CLOSE): Close.read,
    int(Op.BROADCAST): BroadcastPacket.read,
    int(Op.REQUEST): RequestPacket.read,
    int(Op.REPLY): ReplyPacket.read,
    int(Op.SUBSCRIBE): Subscribe.read,
    int(Op.UNSUBSCRIBE): Unsubscribe.read,
    int(Op.PUBLISH): Publish.read,
    int(Op.TUN_INIT): TunnelInit.read,
    int(Op.TUN_CONFIRM): TunnelConfirm.read,
    int(Op.TUN_ALLOW): TunnelAllow.read,
    int(Op.TUN_TRANSFER): TunnelTransfer.read,
    int(Op.TUN_CLOSE): TunnelClose.read,
}
RELAY_READERS: dict[int, PacketReader[RelayPacket]] = {
    int(Op.INIT): Accept.read,
    int(Op.DENY): Deny.read,
    int(Op.CLOSE): Closed.read,
    int(Op.BROADCAST): BroadcastDelivery.read,
    int(Op.REQUEST): RequestDelivery.read,
    int(Op.REPLY): ReplyDelivery.read,
    int(Op.PUBLISH): Publish.read,
    int(Op.TUN_INIT): TunnelOffer.read,
    int(Op.TUN_CONFIRM): TunnelResult.read,
    int(Op.TUN_ALLOW): TunnelAllow.read,
    int(Op.TUN_TRANSFER): TunnelTransfer.read,
    int(Op.TUN_CLOSE): TunnelClosed.read,
}


def _illegal(sender: Side, op: int) -> ProtocolError:
    if op in Op._value2member_map_:
        return ProtocolError(f"a {sender.value} may not send {Op(op).name}")
    return ProtocolError(f"unknown opcode {op:#04x}")


class Decoder(Generic[_Packet]):
    """Turns a byte stream from one side into packets.

    Memory is bounded: the buffer never holds more than one packet's worth of
    unparsed bytes, and a packet's size is bounded by ``max_message`` plus
    PACKET_OVERHEAD. A ProtocolError leaves the decoder unusable; the
    connection must end.

    The type checker knows the packet family from the side:
    ``Decoder(Side.CLIENT)`` is a ``Decoder[ClientPacket]``.
    """

    @overload
    def __init__(
        self: Decoder[ClientPacket], sender: Literal[Side.CLIENT], max_message: int = ...
    ) -> None: ...
    @overload
    def __init__(
        self: Decoder[RelayPacket], sender: Literal[Side.RELAY], max_message: int = ...
    ) -> None: ...
    @overload
    def __init__(
        self: Decoder[ClientPacket | RelayPacket], sender: Side, max_message: int = ...
    ) -> None: ...

    def __init__(self, sender: Side, max_message: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._reader = _Reader(self._buf, max_message)
        self._sender = sender
        # The overloads tie _Packet to the side, which the checker cannot follow here.
        self._readers = cast(
            dict[int, PacketReader[_Packet]],
            CLIENT_READERS if sender is Side.CLIENT else RELAY_READERS,
        )
        # Skip re-parsing a large packet until enough bytes have arrived for it;
        # without this, a 64 MiB message fed in 64 KiB reads costs quadratic time.
        self._need = 1
        self._failed: ProtocolError | None = None

    def feed(self, data: bytes | memoryview) -> list[_Packet]:
        """Add bytes from the wire; return every packet they complete."""
        if self._failed is not None:
            raise ProtocolError("decoder already failed") from self._failed
        buf = self._buf
        buf += data
        if len(buf) < self._need:
            return []
        packets: list[_Packet] = []
        pos, readers, reader = 0, self._readers, self._reader
        bound = reader.max_message + PACKET_OVERHEAD
        try:
            while pos < len(buf):
                reader.limit = pos + bound
                read = readers.get(buf[pos])
                if read is None:
                    raise _illegal(self._sender, buf[pos])
                try:
                    packet, pos = read(reader, pos + 1)
                except IndexError:
                    self._need = len(buf) - pos + 1
                    break
                except _Incomplete as inc:
                    self._need = inc.need - pos
                    break
                packets.append(packet)
            else:
                self._need = 1
        except ProtocolError as err:
            self._failed = err
            raise
        del buf[:pos]
        return packets

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed into a packet."""
        return len(self._buf)
