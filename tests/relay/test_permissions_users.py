"""Relay permissions through real processes: a client runs as uid ``nobody``
(other_user.py, with setpriv) against a relay started as root, each case
with the permissions file and without it.

The file lets only root serve ``secure`` and subscribe to ``secret``, and
only root send to the clusters ``internal-*``. With it, nobody's impostor
is denied at the handshake and root's service answers every request;
nobody's subscription and send close nobody's connection with the reason,
while root's connections carry on. Without it, every one of them succeeds,
as on the original relay.
"""

from __future__ import annotations

import pytest
from other_user import OtherUser
from support import wait_for

import iris
from iris.relay.status import query

PERMISSIONS = """\
default = "open"

[cluster.secure]
serve = ["root"]
send = ["*"]

[cluster."internal-*"]
send = ["root"]

[topic.secret]
subscribe = ["root"]
publish = ["*"]
"""
NOBODY = "user nobody (uid 65534)"


class Genuine(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return b"genuine"


@pytest.fixture
def other_user():
    users = OtherUser()
    yield users
    users.cleanup()


@pytest.fixture(params=[True, False], ids=["with-permissions", "without"])
def guarded(request, relay_factory, tmp_path):
    """A relay with the permissions file, or one without; ``.guarded`` says which."""
    if not request.param:
        relay = relay_factory()
    else:
        path = tmp_path / "permissions.toml"
        path.write_text(PERMISSIONS)
        relay = relay_factory("--permissions", str(path))
    relay.guarded = request.param
    return relay


def refusals(relay) -> dict[str, int]:
    return query(relay.port)["refusals"]


def test_impostor_registration(guarded, other_user, attach):
    service = attach.register(guarded.port, "secure", Genuine())
    impostor = other_user.start(str(guarded.port), "serve", "secure")
    if guarded.guarded:
        assert impostor.line() == [
            "denied",
            f'permission denied: {NOBODY} may not serve cluster "secure"',
        ]
    else:
        assert impostor.line() == ["ready"]
    client = attach.connect(guarded.port)
    answers = [client.request("secure", b"who?", 5) for _ in range(100)]
    if guarded.guarded:
        assert answers == [b"genuine"] * 100
        assert refusals(guarded) == {"serve": 1, "send": 0, "subscribe": 0, "publish": 0}
        warning = "WARNING iris.relay: permission refused: uid=65534 user=nobody action=serve"
        assert f"{warning} cluster=secure" in guarded.log()
    else:
        assert answers.count(b"impostor") >= 30  # the members take turns
        impostor.finish()
    assert not service.conn.closed


def test_subscription(guarded, other_user, attach):
    received: list[bytes] = []
    attach.connect(guarded.port).subscribe("secret", received.append)
    listener = other_user.start(str(guarded.port), "subscribe", "secret")
    assert listener.line() == ["ready"]
    if guarded.guarded:
        assert listener.line() == [
            "closed",
            f'permission denied: {NOBODY} may not subscribe to topic "secret"',
        ]
        subscribers = 1
    else:
        subscribers = 2
    wait_for(lambda: query(guarded.port)["topics"].get("secret") == subscribers)
    attach.connect(guarded.port).publish("secret", b"the plans")
    wait_for(lambda: received == [b"the plans"], what="root's event")
    if guarded.guarded:
        assert refusals(guarded)["subscribe"] == 1
    else:
        assert listener.line() == ["event", "the plans"]
        listener.finish()


def test_send(guarded, other_user, attach):
    attach.register(guarded.port, "internal-api", Genuine())
    sender = other_user.start(str(guarded.port), "request", "internal-api")
    assert sender.line() == ["ready"]
    if guarded.guarded:
        reason = f'permission denied: {NOBODY} may not send to cluster "internal-api"'
        assert sender.line() == ["error", "ClosedError", reason]
        assert sender.line() == ["closed", reason]
        assert refusals(guarded)["send"] == 1
    else:
        assert sender.line() == ["reply", "genuine"]
        sender.finish()
    assert attach.connect(guarded.port).request("internal-api", b"root asks", 5) == b"genuine"


def test_the_same_program_as_root_may_do_all_of_it(guarded, other_user, attach):
    attach.register(guarded.port, "internal-api", Genuine())
    for args in (("serve", "secure"), ("subscribe", "secret"), ("request", "internal-api")):
        client = other_user.start(str(guarded.port), *args, as_nobody=False)
        assert client.line() == ["ready"]
        if args[0] == "request":
            assert client.line() == ["reply", "genuine"]
        client.finish()
    if guarded.guarded:
        assert sum(refusals(guarded).values()) == 0
