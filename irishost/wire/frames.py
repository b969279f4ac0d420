"""The messages between the supervisor and its workers, over the rings.

Each frame is a msgpack array whose first element is its kind. msgpack is
quick to pack small arrays of ints and bytes, and unlike pickle it cannot run
code while decoding, so a corrupted or hostile frame is only a decode error.

Each kind is a small immutable type (a NamedTuple: the request path builds
and reads one per request, and a tuple is the cheapest object to make) with
``encode()``. :func:`decode` checks the kind, the number of fields and each
field's type, so a frame that decodes can be acted on without further checks;
anything else is a :class:`FrameError`, which means the sender is broken.

Supervisor -> worker:

    REQUEST   id, deadline, payload      run handle_request unless past deadline
    BROADCAST payload
    EVENT     topic, payload
    TUNNEL    tunnel id                  a tunnel was accepted for this worker
    TUN_DATA  tunnel id, payload         a message from the remote end
    TUN_SENT  tunnel id, error or None   the last TUN_SEND went out (or failed)
    TUN_CLOSED tunnel id, reason
    DROP      reason                     the relay dropped the supervisor
    DRAIN                                finish what is queued, then exit

Worker -> supervisor:

    READY     pid                        init done; send work
    FAILED    traceback text             import or init failed; exiting
    REPLY     id, success, payload       payload is bytes, or the fault text
    EXPIRED   id                         deadline passed before a thread was free
    TUN_SEND  tunnel id, payload, timeout
    TUN_ACK   tunnel id, size            the handler consumed a message
    TUN_CLOSE tunnel id

Deadlines are CLOCK_MONOTONIC seconds, which all processes on the machine share.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import msgpack

_pack: Callable[[object], bytes] = msgpack.Packer(use_bin_type=True).pack
_NUMBER = (int, float)
_TEXT_OR_NONE = (str, type(None))


class Kind(enum.IntEnum):
    REQUEST = 1
    BROADCAST = 2
    EVENT = 3
    TUNNEL = 4
    TUN_DATA = 5
    TUN_SENT = 6
    TUN_CLOSED = 7
    DROP = 8
    DRAIN = 9
    READY = 20
    FAILED = 26
    REPLY = 21
    EXPIRED = 22
    TUN_SEND = 23
    TUN_ACK = 24
    TUN_CLOSE = 25


class FrameError(Exception):
    """A frame that does not decode, or one its receiver does not expect: the peer is broken."""


# The Python types msgpack decodes a field to that decode() accepts for it.
_FieldType = type | tuple[type, ...]


class _Frame(tuple[object, ...]):
    """What every frame type adds to the NamedTuple of its fields.

    Type checkers accept only fields and methods in a NamedTuple body, so each
    frame type is the NamedTuple of its fields plus this: its wire kind (KIND), the accepted
    Python types of its fields as msgpack decodes them (TYPES, checked by
    decode()) and ``encode()``. Empty ``__slots__`` keep it a plain tuple.
    """

    __slots__ = ()
    KIND: ClassVar[Kind]
    TYPES: ClassVar[tuple[_FieldType, ...]]

    def encode(self) -> bytes:
        """The frame's wire form: its kind, then its fields."""
        return _pack((self.KIND, *self))


# -- supervisor -> worker -----------------------------------------------------------------


class _RequestFields(NamedTuple):
    ticket: int
    deadline: float
    payload: bytes


class Request(_RequestFields, _Frame):
    __slots__ = ()
    KIND = Kind.REQUEST
    TYPES = (int, _NUMBER, bytes)


class _BroadcastFields(NamedTuple):
    payload: bytes


class Broadcast(_BroadcastFields, _Frame):
    __slots__ = ()
    KIND = Kind.BROADCAST
    TYPES = (bytes,)


class _EventFields(NamedTuple):
    topic: str
    payload: bytes


class Event(_EventFields, _Frame):
    __slots__ = ()
    KIND = Kind.EVENT
    TYPES = (str, bytes)


class _TunnelFields(NamedTuple):
    tunnel_id: int


class Tunnel(_TunnelFields, _Frame):
    __slots__ = ()
    KIND = Kind.TUNNEL
    TYPES = (int,)


class _TunDataFields(NamedTuple):
    tunnel_id: int
    payload: bytes


class TunData(_TunDataFields, _Frame):
    __slots__ = ()
    KIND = Kind.TUN_DATA
    TYPES = (int, bytes)


class _TunSentFields(NamedTuple):
    tunnel_id: int
    error: str | None


class TunSent(_TunSentFields, _Frame):
    __slots__ = ()
    KIND = Kind.TUN_SENT
    TYPES = (int, _TEXT_OR_NONE)


class _TunClosedFields(NamedTuple):
    tunnel_id: int
    reason: str


class TunClosed(_TunClosedFields, _Frame):
    __slots__ = ()
    KIND = Kind.TUN_CLOSED
    TYPES = (int, str)


class _DropFields(NamedTuple):
    reason: str


class Drop(_DropFields, _Frame):
    __slots__ = ()
    KIND = Kind.DROP
    TYPES = (str,)


class _DrainFields(NamedTuple):
    pass


class Drain(_DrainFields, _Frame):
    __slots__ = ()
    KIND = Kind.DRAIN
    TYPES = ()


# -- worker -> supervisor -----------------------------------------------------------------


class _ReadyFields(NamedTuple):
    pid: int


class Ready(_ReadyFields, _Frame):
    __slots__ = ()
    KIND = Kind.READY
    TYPES = (int,)


class _FailedFields(NamedTuple):
    traceback: str


class Failed(_FailedFields, _Frame):
    __slots__ = ()
    KIND = Kind.FAILED
    TYPES = (str,)


class _ReplyFields(NamedTuple):
    ticket: int
    success: bool
    payload: bytes | str  # the reply, or the fault text


class Reply(_ReplyFields, _Frame):
    __slots__ = ()
    KIND = Kind.REPLY
    TYPES = (int, bool, (bytes, str))


class _ExpiredFields(NamedTuple):
    ticket: int


class Expired(_ExpiredFields, _Frame):
    __slots__ = ()
    KIND = Kind.EXPIRED
    TYPES = (int,)


class _TunSendFields(NamedTuple):
    tunnel_id: int
    payload: bytes
    # Any value: the supervisor's tunnel checks it when sending, and a bad one
    # closes that tunnel with the tunnel's own ValueError (issue 9, item 13),
    # instead of costing the worker and everything else it holds.
    timeout: object


class TunSend(_TunSendFields, _Frame):
    __slots__ = ()
    KIND = Kind.TUN_SEND
    TYPES = (int, bytes, object)


class _TunAckFields(NamedTuple):
    tunnel_id: int
    size: int


class TunAck(_TunAckFields, _Frame):
    __slots__ = ()
    KIND = Kind.TUN_ACK
    TYPES = (int, int)


class _TunCloseFields(NamedTuple):
    tunnel_id: int


class TunClose(_TunCloseFields, _Frame):
    __slots__ = ()
    KIND = Kind.TUN_CLOSE
    TYPES = (int,)


ToWorker = Request | Broadcast | Event | Tunnel | TunData | TunSent | TunClosed | Drop | Drain
ToSupervisor = Ready | Failed | Reply | Expired | TunSend | TunAck | TunClose
Frame = ToWorker | ToSupervisor

_BY_KIND: dict[int, type[Frame]] = {
    int(frame_type.KIND): frame_type for frame_type in (*ToWorker.__args__, *ToSupervisor.__args__)
}


def decode(data: bytes) -> Frame:
    """The frame ``data`` holds; FrameError if it is not exactly a known frame."""
    try:
        fields = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable frame: {err}") from err
    if type(fields) is not tuple or not fields or type(fields[0]) is not int:
        raise FrameError(f"malformed frame: {fields!r:.80}")
    frame_type = _BY_KIND.get(fields[0])
    if frame_type is None:
        raise FrameError(f"unknown frame kind {fields[0]}")
    values = fields[1:]
    types: tuple[_FieldType, ...] = frame_type.TYPES
    if len(values) != len(types) or not all(map(isinstance, values, types)):
        raise FrameError(_mismatch(frame_type, values))
    return tuple.__new__(frame_type, values)


# The fast path's frames (see irishost/supervisor/fastpath.py). A REQUEST is
# written and read, and a REPLY written and read, once per request, so these
# skip the frame objects; what they make or accept is exactly what encode()
# makes and decode() accepts.
_REQUEST = int(Kind.REQUEST)
_REPLY = int(Kind.REPLY)
_REPLY_HEAD = bytes((0x94, Kind.REPLY))  # msgpack: an array of 4, then the kind


def request_frame(ticket: int, deadline: float, payload: bytes) -> bytes:
    """``Request(ticket, deadline, payload).encode()``, without the Request."""
    return _pack((_REQUEST, ticket, deadline, payload))


def reply_frame(ticket: int, success: bool, payload: bytes | str) -> bytes:
    """``Reply(ticket, success, payload).encode()``, without the Reply
    (0.2 us against 0.6, on a worker's handler thread per request)."""
    return _pack((_REPLY, ticket, success, payload))


def split_replies(batch: list[bytes]) -> tuple[list[int], list[bytes], list[bytes]]:
    """The successful REPLY frames of ``batch``, as their tickets and payloads
    in order, and the other frames, which :func:`decode` then judges.

    One call a batch, with the loop inside: a call a frame cost 0.2 us.
    """
    tickets: list[int] = []
    payloads: list[bytes] = []
    rest: list[bytes] = []
    unpack = msgpack.unpackb
    for data in batch:
        try:
            if not data.startswith(_REPLY_HEAD):
                raise ValueError("not a REPLY")
            _, ticket, success, payload = unpack(data, use_list=False)
        except Exception:  # msgpack raises several unrelated types; decode() says which
            rest.append(data)
            continue
        if success is True and type(ticket) is int and type(payload) is bytes:
            tickets.append(ticket)
            payloads.append(payload)
        else:
            rest.append(data)
    return tickets, payloads, rest


def _mismatch(frame_type: type[Frame], values: tuple[object, ...]) -> str:
    """What is wrong with a frame of a known kind, for the FrameError."""
    name = frame_type.__name__
    types: tuple[_FieldType, ...] = frame_type.TYPES
    if len(values) != len(types):
        return f"{name} frame with {len(values)} fields, not {len(types)}"
    for field, value, expected in zip(frame_type._fields, values, types, strict=True):
        if not isinstance(value, expected):
            return f"{name} frame: {field} is a {type(value).__name__}: {value!r:.40}"
    raise AssertionError("no field of the frame is wrong")
