"""The messages between the supervisor and its workers, over the rings.

Each frame is a msgpack array whose first element is its kind. msgpack is
quick to pack small arrays of ints and bytes, and unlike pickle it cannot run
code while decoding, so a corrupted or hostile frame is only a decode error.

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

import msgpack


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
    """A frame that does not decode: the peer is broken."""


def encode(kind: Kind, *fields) -> bytes:
    return msgpack.packb((int(kind), *fields), use_bin_type=True)


def decode(data: bytes) -> list:
    """A frame as a list whose first item is its Kind value."""
    try:
        frame = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable frame: {err}") from err
    if not isinstance(frame, list) or not frame or not isinstance(frame[0], int):
        raise FrameError(f"malformed frame: {frame!r:.80}")
    return frame
