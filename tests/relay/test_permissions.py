"""The relay's permissions file, its decisions, the socket-owner look-up, and SIGHUP.

The end-to-end cases, with a client running as another user, are in
test_permissions_users.py; these run as whoever runs the tests (root
or not), with the file naming users that exist everywhere (root, nobody).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import wait_for
from test_router import Peer

import iris
import iris.aio
from iris import codec
from iris.relay.passthrough import route_leading
from iris.relay.peer_uid import OwnerFinder, owner_in_table, owners_in_tables, table_address
from iris.relay.permissions import Action, Gate, Permissions, PermissionsError, User
from iris.relay.router import Router

ROOT, NOBODY = User.of(0), User.of(65534)


def load(tmp_path, text: str) -> Permissions:
    path = tmp_path / "permissions.toml"
    path.write_text(text)
    return Permissions.load(path)


# -- the file and its decisions ------------------------------------------------------


def test_the_issues_example_decides_as_written(tmp_path):
    rules = load(
        tmp_path,
        'default = "open"\n'
        "[cluster.secure]\n"
        'serve = ["root", "@root"]\n'
        'send = ["*"]\n'
        "[topic.secret]\n"
        'subscribe = ["root"]\n'
        'publish = ["*"]\n',
    )
    assert rules.allows(ROOT, Action.SERVE, "secure")
    assert not rules.allows(NOBODY, Action.SERVE, "secure")
    assert rules.allows(NOBODY, Action.SEND, "secure")
    assert not rules.allows(NOBODY, Action.SUBSCRIBE, "secret")
    assert rules.allows(NOBODY, Action.PUBLISH, "secret")
    assert rules.allows(NOBODY, Action.SERVE, "elsewhere")  # not listed: default open
    assert rules.allows(NOBODY, Action.SUBSCRIBE, "secure")  # topics are another namespace


def test_exact_beats_prefix_and_longer_prefix_beats_shorter(tmp_path):
    rules = load(
        tmp_path,
        'default = "closed"\n'
        '[cluster."billing-*"]\nserve = ["nobody"]\n'
        '[cluster."billing-eu-*"]\nserve = ["root"]\n'
        '[cluster.billing-eu-main]\nserve = ["nobody"]\nsend = ["*"]\n'
        '[topic."*"]\npublish = ["*"]\n',
    )
    assert rules.allows(NOBODY, Action.SERVE, "billing-us")
    assert not rules.allows(ROOT, Action.SERVE, "billing-us")
    assert rules.allows(ROOT, Action.SERVE, "billing-eu-2")
    assert rules.allows(NOBODY, Action.SERVE, "billing-eu-main")
    assert not rules.allows(ROOT, Action.SEND, "billing-us")  # not listed: default closed
    assert rules.allows(NOBODY, Action.PUBLISH, "anything")  # "*" alone: every name
    assert not rules.allows(ROOT, Action.SERVE, "other")


def test_groups_admit_their_members_by_the_user_database(tmp_path):
    rules = load(tmp_path, 'default = "closed"\n[topic.logs]\nsubscribe = ["@root"]\n')
    assert rules.allows(ROOT, Action.SUBSCRIBE, "logs")  # root's primary group
    assert not rules.allows(NOBODY, Action.SUBSCRIBE, "logs")
    unknown = User.of(None)
    assert str(unknown) == "user unknown (uid unknown)"
    assert not rules.allows(unknown, Action.SUBSCRIBE, "logs")


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        ('default = "opne"\n', 1, "default", 'expected "open" or "closed", got "opne"'),
        ("[cluster.a]\nserve = []\n", None, "default",
         'required key is missing: default = "open" or "closed"'),
        ('default = "open"\ncolour = 1\n', 2, "colour",
         "unknown key; known keys: default, cluster, topic"),
        ('default = "open"\ncluster = 1\n', 2, "cluster",
         "expected tables such as [cluster.NAME], got 1"),
        ('default = "open"\n\n[cluster.secure]\nserve = ["root"]\nsubscribe = ["*"]\n', 5,
         "cluster.secure.subscribe", "unknown key; a cluster takes serve, send"),
        ('default = "open"\n[topic.news]\nsend = ["*"]\n', 3, "topic.news.send",
         "unknown key; a topic takes subscribe, publish"),
        ('default = "open"\n[cluster.secure]\nserve = ["rooot"]\n', 3, "cluster.secure.serve",
         'unknown user "rooot"'),
        ('default = "open"\n[cluster.secure]\nserve = ["@no-such-group"]\n', 3,
         "cluster.secure.serve", 'unknown group "@no-such-group"'),
        ('default = "open"\n[cluster.secure]\nserve = "root"\n', 3, "cluster.secure.serve",
         'expected an array of users, "@groups" or "*", got "root"'),
        ('default = "open"\n[cluster.secure]\nserve = ["root", 7]\n', 3, "cluster.secure.serve",
         'expected an array of users, "@groups" or "*", got 7 in it'),
        ('default = "open"\n[cluster."a*b"]\nserve = ["root"]\n', 2, 'cluster."a*b"',
         "a cluster name may end in * (a prefix) and hold no other *"),
        ('default = "open"\n[topic.x]\n[topic."billing-*"]\nsubscribe = [""]\n', 4,
         'topic."billing-*".subscribe', 'expected an array of users, "@groups" or "*", '
         'got "" in it'),
        ('default = "open"\ncluster.inline = { serve = ["nobody", "ghost"] }\n', 2,
         "cluster.inline.serve", 'unknown user "ghost"'),
    ],
)  # fmt: skip
def test_a_bad_file_names_the_line_and_the_key(tmp_path, text, line, key, problem):
    with pytest.raises(PermissionsError) as caught:
        load(tmp_path, text)
    path = tmp_path / "permissions.toml"
    where = path if line is None else f"{path}:{line}"
    assert str(caught.value) == f"{where}: {key}: {problem}"


def test_a_file_that_is_no_toml_or_missing_says_so(tmp_path):
    with pytest.raises(PermissionsError, match=r"permissions.toml: invalid TOML: .*line 2"):
        load(tmp_path, 'default = "open"\n[cluster\n')
    with pytest.raises(PermissionsError, match=r"missing.toml: cannot read: No such file"):
        Permissions.load(tmp_path / "missing.toml")


# -- the owner of a socket -----------------------------------------------------------

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:D903 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:C350 0100007F:D903 06 00000000:00000000 03:00000F39 00000000     0        0 0 3
   2: 0100007F:C351 0100007F:D903 01 00000000:00000000 00:00000000 00000000  1000        0 2 1
   3: 0100007F:D903 0100007F:C351 01 00000000:00000000 00:00000000 00000000     0        0 3 1
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000001000000:C351 00000000000000000000000001000000:D903 01 00000000:00000000 00:00000000 00000000    33        0 4 1
"""  # noqa: E501 - the kernel's line


def test_table_addresses_are_the_kernels():
    if sys.byteorder != "little":
        pytest.skip("the tables below are a little-endian machine's")
    assert table_address(("127.0.0.1", 55555)) == "0100007F:D903"
    assert table_address(("::1", 50001, 0, 0)) == "00000000000000000000000001000000:C351"


def test_the_owner_is_the_established_client_socket_of_the_pair():
    if sys.byteorder != "little":
        pytest.skip("the tables below are a little-endian machine's")
    relay = ("127.0.0.1", 55555)
    assert owner_in_table(TCP, (("127.0.0.1", 50001), relay)) == 1000
    assert owner_in_table(TCP, (("127.0.0.1", 50000), relay)) is None  # TIME_WAIT: uid 0
    assert owner_in_table(TCP, (("127.0.0.1", 50002), relay)) is None
    relay6 = ("::1", 55555, 0, 0)
    assert owner_in_table(TCP6, (("::1", 50001, 0, 0), relay6)) == 33


def with_the_diagnostics(connections):
    finder = OwnerFinder()
    try:
        if finder.method != "sock_diag":
            pytest.skip("no socket diagnostics (netlink) here")
        return finder.owners(connections)
    finally:
        finder.close()


@pytest.mark.parametrize("owners", [with_the_diagnostics, owners_in_tables])
@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_real_loopback_sockets_are_found_and_gone_ones_are_not(family, host, owners):
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen()
        client = socket.socket(family)
        client.connect(listener.getsockname())
        accepted, address = listener.accept()
        with accepted:
            ends = (address, accepted.getsockname())
            assert owners([ends]) == {ends: os.geteuid()}
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            client.close()  # a reset: the socket is gone at once
            wait_for(lambda: owners([ends]) == {ends: None}, what="the socket gone")


# -- decisions on connections --------------------------------------------------------


def guarded_peer(router: Router, user: User, cluster: str = "") -> Peer:
    peer = Peer()
    peer.user, peer.cleared, peer.cleared_topics = user, set(), set()
    router.handle(peer, codec.Init(cluster))
    return peer


def test_a_send_is_decided_once_per_connection_and_cluster_then_takes_the_fast_path(tmp_path):
    rules = load(tmp_path, 'default = "open"\n[cluster.secure]\nsend = ["root"]\n')
    router = Router(clock=lambda: 0.0, gate=Gate(rules))
    member = guarded_peer(router, ROOT, "secure")
    sender = guarded_peer(router, ROOT)
    request = codec.RequestPacket(1, "secure", b"x", 1000).encode()
    assert route_leading(router, sender, request, codec.MAX_MESSAGE) == 0  # not decided yet
    router.handle(sender, codec.RequestPacket(1, "secure", b"x", 1000))  # the router decides
    assert sender.cleared == {b"secure"}
    assert route_leading(router, sender, request, codec.MAX_MESSAGE) == len(request)
    assert len(member.sent) == 3  # ACCEPT and two deliveries

    for refused in (codec.BroadcastPacket("secure", b"x"), codec.TunnelInit(1, "secure", 1000)):
        intruder = guarded_peer(router, NOBODY)
        router.handle(intruder, refused)
        assert intruder.closed and intruder.cleared == set()
    assert router.gate is not None and router.gate.refusals["send"] == 2
    assert not member.closed and not sender.closed
    assert len(member.sent) == 3  # neither reached it


def test_a_publish_is_decided_once_per_connection_and_topic(tmp_path):
    rules = load(tmp_path, 'default = "open"\n[topic."audit-*"]\npublish = ["root"]\n')
    router = Router(gate=Gate(rules))
    listener, publisher = guarded_peer(router, NOBODY), guarded_peer(router, ROOT)
    router.handle(listener, codec.Subscribe("audit-log"))
    for _ in range(2):
        router.handle(publisher, codec.Publish("audit-log", b"entry"))
    assert publisher.cleared_topics == {"audit-log"} and len(listener.sent) == 3
    router.handle(listener, codec.Publish("audit-log", b"forged"))
    assert listener.closed and not publisher.closed and len(listener.sent) == 3


def test_a_refused_registration_is_denied_with_the_reason(tmp_path):
    rules = load(tmp_path, 'default = "closed"\n')
    router = Router(gate=Gate(rules))
    peer = guarded_peer(router, NOBODY, "anything")
    reason = 'permission denied: user nobody (uid 65534) may not serve cluster "anything"'
    assert peer.sent == [codec.Deny(reason).encode()] and peer.closed
    assert router.census()[0] == {}
    assert guarded_peer(router, NOBODY).sent == [codec.Accept().encode()]  # a plain client


# -- the relay process: the flag and SIGHUP -------------------------------------------

ROOT_MAY_NOT = 'default = "open"\n[cluster.secure]\nserve = ["nobody"]\n'
ROOT_MAY = 'default = "open"\n[cluster.secure]\nserve = ["root"]\n'


class Echo(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return request


def test_sighup_rereads_the_file_keeps_the_old_rules_on_a_bad_one_and_rechecks_members(
    relay_factory, attach, tmp_path
):
    if os.geteuid() != 0:
        pytest.skip("the file names root as the user that runs the tests")
    path = tmp_path / "permissions.toml"
    path.write_text(ROOT_MAY_NOT)
    relay = relay_factory("--permissions", str(path))
    with pytest.raises(iris.DeniedError, match="user root .uid 0. may not serve cluster"):
        attach.register(relay.port, "secure", Echo())

    def reload(text: str, logged: str, times: int = 1) -> None:
        path.write_text(text)
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: relay.log().count(logged) == times, what=logged)

    reload(ROOT_MAY, "permissions reloaded from")
    service = attach.register(relay.port, "secure", Echo())
    assert attach.connect(relay.port).request("secure", b"served", 5) == b"served"

    reload('default = "open"\n[cluster.secure]\nserve = ["rooot"]\n', "ERROR iris.relay")
    assert f'{path}:3: cluster.secure.serve: unknown user "rooot"' in relay.log()
    attach.register(relay.port, "secure", Echo())  # the old rules stay

    reload(ROOT_MAY_NOT, "permissions reloaded from", times=2)
    assert service.conn.wait_closed(5)
    assert service.conn.close_reason == (
        'permission denied: user root (uid 0) may not serve cluster "secure"'
    )


def test_a_bad_permissions_file_stops_the_relay_at_start_naming_line_and_key(tmp_path):
    path = tmp_path / "permissions.toml"
    path.write_text('default = "sometimes"\n')
    done = subprocess.run(
        [sys.executable, "-m", "iris.relay", "--port", "0", "--permissions", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f'iris-relay: --permissions: {path}:1: default: expected "open" or "closed", '
        'got "sometimes"\n'
    )


def test_the_shipped_example_holds_as_soon_as_its_user_exists(tmp_path):
    shipped = Path(__file__).resolve().parents[2] / "systemd" / "iris-relay-permissions.toml"
    rules = load(tmp_path, shipped.read_text().replace('"primes"', '"nobody"'))
    assert rules.allows(NOBODY, Action.SERVE, "primes")
    assert not rules.allows(ROOT, Action.SERVE, "primes")
    assert rules.allows(ROOT, Action.SEND, "primes")


def test_the_asyncio_binding_raises_the_same_errors(relay_factory, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the file names root as the user that runs the tests")
    path = tmp_path / "permissions.toml"
    path.write_text(ROOT_MAY_NOT + '[topic.secret]\nsubscribe = ["nobody"]\n')
    relay = relay_factory("--permissions", str(path))
    reason = 'permission denied: user root (uid 0) may not subscribe to topic "secret"'

    async def refused() -> None:
        with pytest.raises(iris.DeniedError, match="user root .uid 0. may not serve cluster"):
            await iris.aio.register(relay.port, "secure", iris.aio.ServiceHandler())
        async with iris.aio.connect(relay.port) as conn:
            await conn.subscribe("secret", lambda event: None)
            with pytest.raises(iris.ClosedError, match=re.escape(reason)):
                await asyncio.wait_for(conn.request("elsewhere", b"x", 5), 5)
            with pytest.raises(iris.ClosedError, match=re.escape(reason)):
                await conn.publish("news", b"x")

    asyncio.run(refused())
