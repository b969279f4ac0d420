"""Frames between the supervisor and its workers: every kind round-trips, and
decode() refuses a wrong kind, field count or field type with FrameError."""

from __future__ import annotations

import msgpack
import pytest

from irishost.wire import frames

EXAMPLES = [
    frames.Request(7, 12.5, b"payload"),
    frames.Broadcast(b"all of you"),
    frames.Event("prices", b"up"),
    frames.Tunnel(3),
    frames.TunData(3, b"chunk"),
    frames.TunSent(3, None),
    frames.TunSent(3, "timeout"),
    frames.TunClosed(3, "remote end closed"),
    frames.Drop("relay shutting down"),
    frames.Drain(),
    frames.Ready(4242),
    frames.Failed("Traceback ...\nRuntimeError: no"),
    frames.Reply(7, True, b"answer"),
    frames.Reply(7, False, "ValueError: bad"),
    frames.Expired(7),
    frames.TunSend(3, b"out", 1.5),
    frames.TunSend(3, b"out", None),
    frames.TunAck(3, 5),
    frames.TunClose(3),
]


def raw(*values) -> bytes:
    return msgpack.packb(values, use_bin_type=True)


@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: type(f).__name__)
def test_every_kind_round_trips(frame):
    decoded = frames.decode(frame.encode())
    assert decoded == frame and type(decoded) is type(frame)


def test_every_kind_has_one_type_and_one_example():
    kinds = {type(frame).KIND for frame in EXAMPLES}
    assert kinds == set(frames.Kind)


def test_frames_are_immutable():
    with pytest.raises(AttributeError):
        frames.Request(1, 2.0, b"x").ticket = 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xc1", "undecodable frame"),
        (raw(), "malformed frame"),
        (msgpack.packb({"kind": 1}), "malformed frame"),
        (raw("1", 2), "malformed frame"),
        (raw(99, 1), "unknown frame kind 99"),
        (raw(int(frames.Kind.REPLY), 7, True), "Reply frame with 2 fields, not 3"),
        (raw(int(frames.Kind.DRAIN), 1), "Drain frame with 1 fields, not 0"),
        (raw(int(frames.Kind.REPLY), "7", True, b"x"), "Reply frame: ticket is a str"),
        (raw(int(frames.Kind.REPLY), 7, 1, b"x"), "Reply frame: success is a int"),
        (raw(int(frames.Kind.REQUEST), 1, 2.0, "text"), "Request frame: payload is a str"),
        (raw(int(frames.Kind.TUN_ACK), 3, None), "TunAck frame: size is a NoneType"),
        (raw(int(frames.Kind.READY), [1]), "Ready frame: pid is a tuple"),
    ],
)
def test_decode_refuses_what_is_not_exactly_a_frame(data, message):
    with pytest.raises(frames.FrameError, match=message):
        frames.decode(data)


def test_a_tunnel_send_timeout_is_left_for_the_tunnel_to_check():
    """The bridge's tunnel.send() raises the precise ValueError for a bad timeout
    and closes only that tunnel (see test_irishost_hardening)."""
    assert frames.decode(raw(int(frames.Kind.TUN_SEND), 3, b"x", "5")).timeout == "5"


def test_the_fast_path_frames_are_the_ones_encode_and_decode_know():
    assert frames.request_frame(7, 1.5, b"x") == frames.Request(7, 1.5, b"x").encode()
    for success, payload in ((True, b"ok"), (False, "fault text")):
        reply = frames.reply_frame(7, success, payload)
        assert reply == frames.Reply(7, success, payload).encode()
        assert frames.decode(reply) == frames.Reply(7, success, payload)
    others = [
        frames.Reply(7, False, "fault").encode(),
        frames.Expired(7).encode(),
        frames.Ready(1).encode(),
        raw(frames.Kind.REPLY, 7, True),  # 3 fields
        bytes((0x94, frames.Kind.REPLY, 0xC1)),  # a REPLY's head, then undecodable
    ]
    ok = [frames.Reply(7, True, b"ok").encode(), frames.Reply(8, True, b"").encode()]
    batch = [ok[0], others[0], others[1], ok[1], *others[2:]]
    assert frames.split_replies(batch) == ([7, 8], [b"ok", b""], others)
