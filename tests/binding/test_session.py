"""The session core in-process: the relay's bytes and the caller's operations
in, bytes to send and events out (iris.session). No socket, thread or loop:
what the real-process tests of both bindings rest on."""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from iris import codec
from iris.errors import ClosedError, DeniedError, RemoteError, TimeoutError
from iris.limits import TUNNEL_BUFFER
from iris.logs import ContextLog, HandlerErrorLog
from iris.session import (
    RELAY_GRACE,
    Accepted,
    CallAnswered,
    Deliveries,
    Refused,
    RelayEnded,
    Session,
    Subscription,
    TopicEvent,
    TunnelAllowed,
    TunnelData,
    TunnelEnded,
    TunnelOffered,
    TunnelOpened,
    TunnelRefused,
)

ERRORS = HandlerErrorLog(ContextLog())


class FakeTunnel:
    """What a shell's tunnel class is to the session: an object it keeps."""

    def __init__(self, tid: int, chunk_limit: int):
        self.id = tid
        self.chunk_limit = chunk_limit


class Pool:
    """A subscription's pool, as far as the session is concerned: opaque."""

    def __init__(self, name: str, threads: int, memory: int, errors: HandlerErrorLog):
        self.name = name


def new_session(member: bool = False, route=None) -> Session[str, FakeTunnel, Pool]:
    return Session(FakeTunnel, member=member, route_leading=route)


def accepted(member: bool = False, route=None) -> Session[str, FakeTunnel, Pool]:
    session = new_session(member, route)
    assert session.receive_data(codec.Accept().encode()) == [Accepted()]
    return session


def subscription() -> Subscription[Pool]:
    return Subscription.of("news", print, None, Pool, ERRORS)


def decode_client(data: bytes) -> list[codec.ClientPacket]:
    return codec.Decoder(codec.Side.CLIENT).feed(data)


# -- the handshake -----------------------------------------------------------------


def test_the_handshake_says_init_and_takes_accept_with_what_came_after_it():
    session = new_session(member=True)
    assert decode_client(session.hello("echo")) == [codec.Init("echo")]
    early = codec.Accept().encode() + codec.BroadcastDelivery(b"hi").encode()
    assert session.receive_data(early) == [Accepted(), codec.BroadcastDelivery(b"hi")]


def test_a_deny_refuses_and_ends_without_a_drop():
    session = new_session()
    [refused] = session.receive_data(codec.Deny("no such user").encode())
    assert isinstance(refused, Refused) and isinstance(refused.error, DeniedError)
    ended = session.end()
    assert ended.first and not ended.dropped
    assert "no such user" in ended.reason
    with pytest.raises(ClosedError, match="no such user"):
        session.check_request("echo", b"x", 1)


def test_anything_but_an_answer_during_the_handshake_breaks_the_protocol():
    session = new_session()
    [ended] = session.receive_data(codec.ReplyDelivery(0, True).encode())
    assert ended == RelayEnded("unexpected packet ReplyDelivery")
    assert session.end().reason.startswith("protocol violation by relay")


# -- requests ------------------------------------------------------------------------


def test_a_request_is_checked_registered_answered_and_forgotten():
    session = accepted()
    session.check_request("echo", bytearray(b"hi"), 1.5)
    call, data = session.request("echo", bytearray(b"hi"), 1.5, now=100.0, waiter="w")
    assert decode_client(data) == [codec.RequestPacket(call.id, "echo", b"hi", 1500)]
    assert call.deadline == 100.0 + 1.5 + RELAY_GRACE and session.pending
    reply = codec.ReplyDelivery(call.id, False, True, b"answer")
    assert session.receive_data(reply.encode()) == [CallAnswered(call, reply)]
    assert call.outcome(reply) == b"answer"
    assert not session.pending
    # A second answer for the same id (a relay bug, or a late one) finds no call.
    assert session.receive_data(reply.encode()) == []


def test_a_reply_says_timeout_or_fault_as_the_callers_error():
    session = accepted()
    call, _ = session.request("echo", b"x", 0.01, 0.0, "w")
    with pytest.raises(TimeoutError, match="request to 'echo' timed out after 0.01 s"):
        call.outcome(codec.ReplyDelivery(call.id, True))
    with pytest.raises(RemoteError, match="KeyError"):
        call.outcome(codec.ReplyDelivery(call.id, False, False, "KeyError: 'user'"))


@pytest.mark.parametrize(
    ("cluster", "request_", "timeout", "match"),
    [
        ("", b"x", 1, "cluster name"),
        (7, b"x", 1, "cluster name"),
        ("echo", b"", 1, "must not be empty"),
        ("echo", "text", 1, "must be bytes"),
        ("echo", b"x", 0.0001, "timeout"),
        ("echo", b"x", math.nan, "timeout"),
        ("echo", b"x", True, "timeout"),
        ("echo", b"x", 2e9, "timeout"),
    ],
)
def test_a_callers_mistake_is_a_value_error_before_anything_is_sent(
    cluster, request_, timeout, match
):
    with pytest.raises(ValueError, match=match):
        accepted().check_request(cluster, request_, timeout)
    session = accepted()
    with pytest.raises(ValueError, match=match):
        session.request(cluster, request_, timeout, 0.0, "w")
    assert not session.pending


def test_overdue_takes_the_calls_past_their_deadline_only():
    session = accepted()
    early, _ = session.request("echo", b"x", 1.0, 0.0, "early")
    late, _ = session.request("echo", b"x", 9.0, 0.0, "late")
    tunnel, _ = session.tunnel("echo", 1.0, 0.0, "tunnel")
    assert session.overdue(1.0 + RELAY_GRACE) == []
    assert session.overdue(1.5 + RELAY_GRACE) == [early, tunnel]
    assert session.pending
    session.forget(late)
    assert not session.pending


# -- events and subscriptions -------------------------------------------------------


def test_events_reach_their_subscription_until_it_is_gone():
    session = accepted()
    sub = subscription()
    assert decode_client(session.subscribe("news", sub)) == [codec.Subscribe("news")]
    assert sub.pool.name == "topic-news"
    with pytest.raises(ValueError, match="already subscribed"):
        session.subscribe("news", subscription())
    event = codec.Publish("news", b"e").encode()
    assert session.receive_data(event) == [TopicEvent(sub, b"e")]
    gone, data = session.unsubscribe("news")
    assert gone is sub and decode_client(data) == [codec.Unsubscribe("news")]
    assert session.receive_data(event) == []  # in flight while unsubscribing: dropped
    with pytest.raises(ValueError, match="not subscribed"):
        session.unsubscribe("news")


def test_a_subscription_needs_a_handler_that_can_be_called():
    with pytest.raises(ValueError, match="TopicHandler or a callable"):
        Subscription.of("news", b"not callable", None, Pool, ERRORS)


def test_broadcast_and_publish_are_checked_and_encoded():
    session = accepted()
    assert session.check_broadcast("all", memoryview(b"m")) == b"m"
    assert decode_client(session.broadcast("all", b"m")) == [codec.BroadcastPacket("all", b"m")]
    assert decode_client(session.publish("news", b"e")) == [codec.Publish("news", b"e")]
    with pytest.raises(ValueError, match="topic name"):
        session.check_publish("", b"e")
    # The operations check for themselves: a shell with room calls no check_*.
    assert decode_client(session.publish("news", bytearray(b"e"))) == [codec.Publish("news", b"e")]
    with pytest.raises(ValueError, match="topic name"):
        session.publish("", b"e")
    with pytest.raises(ValueError, match="message must not be empty"):
        session.broadcast("all", b"")
    session.close()
    with pytest.raises(ClosedError):
        session.broadcast("all", b"m")


# -- a shell's deliveries ------------------------------------------------------------


def test_a_shell_given_deliveries_gets_the_frequent_packets_as_they_are_decoded():
    """Replies, requests, broadcasts and topic events go to the shell's
    handlers in the order they came, no event for them in the list; the rest
    still come back as events, and a plain client still refuses inbound work."""
    got: list[tuple[object, ...]] = []
    deliveries = Deliveries(
        lambda call, reply: got.append(("answered", call, reply)),
        lambda packet: got.append(("request", packet)),
        lambda packet: got.append(("broadcast", packet)),
        lambda sub, event: got.append(("event", sub, event)),
    )
    session = Session(FakeTunnel, member=True, deliveries=deliveries)
    assert session.receive_data(codec.Accept().encode()) == [Accepted()]
    call, _ = session.request("echo", b"x", 1.0, 0.0, "w")
    sub = subscription()
    session.subscribe("news", sub)
    reply = codec.ReplyDelivery(call.id, False, True, b"answer")
    request = codec.RequestDelivery(5, b"q", 1000)
    broadcast = codec.BroadcastDelivery(b"b")
    data = b"".join(
        packet.encode()
        for packet in (
            request,
            reply,
            codec.Publish("news", b"e"),
            codec.Publish("gone", b"e"),  # no subscription: dropped
            broadcast,
            codec.TunnelOffer(3, 1024),
        )
    )
    [offered] = session.receive_data(data)
    assert type(offered) is TunnelOffered
    assert got == [
        ("request", request),
        ("answered", call, reply),
        ("event", sub, b"e"),
        ("broadcast", broadcast),
    ]
    assert not session.pending  # the answered call has left the session
    client = Session(FakeTunnel, deliveries=deliveries)
    client.receive_data(codec.Accept().encode())
    [ended] = client.receive_data(request.encode())
    assert ended == RelayEnded("relay sent a request to a plain client")


# -- a member's inbound work --------------------------------------------------------


def test_requests_broadcasts_and_tunnels_reach_only_a_member():
    member = accepted(member=True)
    delivery = codec.RequestDelivery(5, b"q", 1000)
    assert member.receive_data(delivery.encode()) == [delivery]
    for packet, what in [
        (delivery, "a request"),
        (codec.BroadcastDelivery(b"b"), "a broadcast"),
        (codec.TunnelOffer(3, 1024), "a tunnel"),
    ]:
        client = accepted()
        [ended] = client.receive_data(packet.encode())
        assert ended == RelayEnded(f"relay sent {what} to a plain client")
        assert client.end().dropped


def test_route_leading_takes_the_requests_at_the_start_of_a_read_once_accepted():
    taken: list[bytes] = []

    def route(data: bytes) -> int:
        taken.append(data)
        return len(codec.RequestDelivery(1, b"fast", 100).encode())

    session = new_session(member=True, route=route)
    assert session.receive_data(codec.Accept().encode()) == [Accepted()]
    assert taken == []  # not during the handshake
    slow = codec.RequestDelivery(2, b"slow", 100)
    data = codec.RequestDelivery(1, b"fast", 100).encode() + slow.encode()
    assert session.receive_data(memoryview(data)) == [slow]
    assert taken == [data]


# -- tunnels ------------------------------------------------------------------------


def test_an_offered_tunnel_is_confirmed_with_a_full_allowance_and_routed():
    session = accepted(member=True)
    [offered] = session.receive_data(codec.TunnelOffer(77, 4096).encode())
    assert isinstance(offered, TunnelOffered)
    tunnel = offered.tunnel
    assert tunnel.chunk_limit == 4096
    assert decode_client(offered.send) == [
        codec.TunnelConfirm(77, tunnel.id),
        codec.TunnelAllow(tunnel.id, TUNNEL_BUFFER),
    ]
    packets = (
        codec.TunnelAllow(tunnel.id, 10).encode()
        + codec.TunnelTransfer(tunnel.id, 3, b"abc").encode()
        + codec.TunnelClosed(tunnel.id, "bye").encode()
        + codec.TunnelAllow(tunnel.id, 10).encode()  # after its close: no tunnel
    )
    assert session.receive_data(packets) == [
        TunnelAllowed(tunnel, 10),
        TunnelData(tunnel, 3, b"abc"),
        TunnelEnded(tunnel, "bye"),
    ]


def test_a_tunnel_call_is_opened_refused_or_closed_when_its_caller_gave_up():
    session = accepted()
    call, data = session.tunnel("echo", 2.0, 0.0, "w")
    assert decode_client(data) == [codec.TunnelInit(call.id, "echo", 2000)]
    [opened] = session.receive_data(codec.TunnelResult(call.id, False, 512).encode())
    assert opened == TunnelOpened(
        call, opened.tunnel, codec.TunnelAllow(call.id, TUNNEL_BUFFER).encode()
    )

    refused, _ = session.tunnel("echo", 2.0, 0.0, "w")
    assert session.receive_data(codec.TunnelResult(refused.id, True).encode()) == [
        TunnelRefused(refused)
    ]
    assert "tunnel to 'echo' timed out" in str(refused.timed_out())

    gave_up, _ = session.tunnel("echo", 2.0, 0.0, "w")
    session.forget(gave_up)
    [late] = session.receive_data(codec.TunnelResult(gave_up.id, False, 512).encode())
    assert isinstance(late, TunnelOpened) and late.call is None  # the shell closes it


def test_a_tunnel_with_no_chunk_limit_breaks_the_protocol():
    session = accepted()
    call, _ = session.tunnel("echo", 2.0, 0.0, "w")
    [ended] = session.receive_data(codec.TunnelResult(call.id, False, 0).encode())
    assert ended == RelayEnded("tunnel chunk limit 0 is not positive")


# -- the end ------------------------------------------------------------------------


def test_a_graceful_close_is_no_drop_and_hands_back_all_that_was_pending():
    session = accepted()
    call, _ = session.request("echo", b"x", 1.0, 0.0, "w")
    session.subscribe("news", sub := subscription())
    [offered] = accepted(member=True).receive_data(codec.TunnelOffer(1, 10).encode())
    assert decode_client(session.close() or b"") == [codec.Close()]
    assert session.close() is None  # one CLOSE only
    with pytest.raises(ClosedError):
        session.check_publish("news", b"e")
    assert session.receive_data(codec.Closed().encode()) == [RelayEnded(None)]
    ended = session.end()
    assert (ended.reason, ended.dropped, ended.first) == ("connection closed", False, True)
    assert ended.calls == [call] and ended.subscriptions == [sub]
    assert session.end().first is False
    del offered


def test_the_relays_reason_makes_a_drop_even_while_closing():
    session = accepted()
    session.close()
    session.receive_data(codec.Closed("relay shutting down").encode())
    ended = session.end()
    assert ended.dropped and ended.reason == "relay shutting down"
    with pytest.raises(ClosedError, match="relay shutting down"):
        session.check_request("echo", b"x", 1)


def test_a_lost_transport_is_a_drop_that_says_why():
    session = accepted()
    ended = session.end("Connection reset by peer")
    assert ended.dropped and ended.reason == "connection lost: Connection reset by peer"


def test_a_call_registered_after_the_end_is_refused_not_left_waiting():
    session = accepted()
    session.check_request("echo", b"x", 1)  # checked before the end (waiting for room)
    session.end()
    with pytest.raises(ClosedError):
        session.request("echo", b"x", 1, 0.0, "w")
    assert not session.pending


def test_nothing_is_read_after_the_relays_close():
    session = accepted()
    call, _ = session.request("echo", b"x", 1.0, 0.0, "w")
    data = codec.Closed().encode() + codec.ReplyDelivery(call.id, True).encode()
    assert session.receive_data(data) == [RelayEnded(None)]
    assert session.end().calls == [call]


# -- random sequences of operations and packets --------------------------------------


class SessionMachine(RuleBasedStateMachine):
    """Any sequence of caller operations and relay packets keeps the promise
    the shells rely on: every call is answered once, given back by end(), or
    forgotten by its caller; never two of these, never none."""

    calls = Bundle("calls")

    def __init__(self) -> None:
        super().__init__()
        self.session: Session[str, FakeTunnel, Pool] = accepted(member=True)
        self.waiting: dict[int, object] = {}  # the model: calls neither answered nor forgotten
        self.settled: set[int] = set()
        self.topics: set[str] = set()
        self.ended = False
        self.closing = False  # close() was asked for, or the session ended: operations refuse

    def _settle(self, call: object) -> None:
        cid = call.id  # type: ignore[attr-defined]
        assert cid not in self.settled, f"call {cid} settled twice"
        assert self.waiting.pop(cid) is call
        self.settled.add(cid)

    def _receive(self, packet: codec.RelayPacket) -> list[object]:
        events = self.session.receive_data(packet.encode())
        for event in events:
            answered = isinstance(event, CallAnswered | TunnelRefused | TunnelOpened)
            if answered and event.call is not None:  # type: ignore[union-attr]
                self._settle(event.call)  # type: ignore[union-attr]
            elif isinstance(event, RelayEnded):
                self._end()
        return events

    def _end(self, lost: str | None = None) -> None:
        ended = self.session.end(lost)
        assert ended.first is not self.ended
        for call in ended.calls:
            self._settle(call)
        assert not self.waiting
        self.ended = self.closing = True

    @rule(target=calls, timeout=st.floats(0.001, 100), data=st.binary(min_size=1, max_size=8))
    def request(self, timeout: float, data: bytes) -> object:
        try:
            call, sent = self.session.request("echo", data, timeout, 0.0, "w")
        except ClosedError:
            assert self.closing
            return None
        assert not self.closing
        assert decode_client(sent)[0].id == call.id  # type: ignore[union-attr]
        self.waiting[call.id] = call
        return call

    @rule(target=calls, timeout=st.floats(0.001, 100))
    def tunnel(self, timeout: float) -> object:
        try:
            call, _ = self.session.tunnel("echo", timeout, 0.0, "w")
        except ClosedError:
            assert self.closing
            return None
        self.waiting[call.id] = call
        return call

    @rule(call=calls, success=st.booleans(), timed_out=st.booleans())
    def relay_answers(self, call: object, success: bool, timed_out: bool) -> None:
        if call is None or self.ended:
            return
        cid = call.id  # type: ignore[attr-defined]
        if call.kind == "request":  # type: ignore[attr-defined]
            packet: codec.RelayPacket = (
                codec.ReplyDelivery(cid, True)
                if timed_out
                else codec.ReplyDelivery(cid, False, success, b"r" if success else "fault")
            )
        else:
            packet = codec.TunnelResult(cid, timed_out, 0 if timed_out else 64)
        events = self._receive(packet)
        if cid in self.settled and call.kind == "request":  # type: ignore[attr-defined]
            assert events in ([], [CallAnswered(call, packet)])  # type: ignore[arg-type]

    @rule(call=consumes(calls))
    def caller_gives_up(self, call: object) -> None:
        if call is None:
            return
        self.session.forget(call)  # type: ignore[arg-type]
        if call.id in self.waiting:  # type: ignore[attr-defined]
            self._settle(call)

    @rule(cid=st.integers(0, 2**40))
    def relay_answers_an_unknown_id(self, cid: int) -> None:
        if self.ended or cid in self.waiting:
            return
        assert self._receive(codec.ReplyDelivery(cid, True)) == []

    @rule(topic=st.sampled_from(["a", "b", "c"]))
    def subscribe(self, topic: str) -> None:
        try:
            self.session.subscribe(topic, subscription())
        except ClosedError:
            assert self.closing
        except ValueError:
            assert topic in self.topics
        else:
            assert topic not in self.topics and not self.closing
            self.topics.add(topic)

    @rule(topic=st.sampled_from(["a", "b", "c"]))
    def unsubscribe(self, topic: str) -> None:
        try:
            self.session.unsubscribe(topic)
        except ClosedError:
            assert self.closing
        except ValueError:
            assert topic not in self.topics
        else:
            self.topics.remove(topic)

    @rule(topic=st.sampled_from(["a", "b", "c"]))
    def relay_publishes(self, topic: str) -> None:
        if self.ended:
            return
        events = self._receive(codec.Publish(topic, b"e"))
        assert len(events) == (1 if topic in self.topics else 0)

    @rule()
    def close(self) -> None:
        farewell = self.session.close()
        assert (farewell is None) == self.closing
        if farewell is not None:
            assert decode_client(farewell) == [codec.Close()]
        self.closing = True

    @precondition(lambda self: not self.ended)
    @rule(reason=st.sampled_from(["", "relay shutting down"]))
    def relay_closes(self, reason: str) -> None:
        assert self._receive(codec.Closed(reason)) == [RelayEnded(None)]

    @precondition(lambda self: not self.ended)
    @rule()
    def relay_breaks_the_protocol(self) -> None:
        [ended] = self._receive(codec.Accept())  # a second accept
        assert isinstance(ended, RelayEnded) and ended.violation

    @rule(lost=st.none() | st.just("reset"))
    def transport_ends(self, lost: str | None) -> None:
        if self.ended:
            assert self.session.end(lost).first is False
        else:
            self._end(lost)

    @invariant()
    def the_session_waits_for_what_the_model_does(self) -> None:
        assert self.session.pending == bool(self.waiting)
        assert self.session.ended == self.ended


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
