"""The supervisor's relay link against a real in-process relay: its one state
goes starting -> connected -> reconnecting (the relay went away) -> stopping."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest
from support import wait_for

from iris.logs import ContextLog
from iris.relay import RelayServer
from irishost.config import load_config
from irishost.exits import Exit, HostError
from irishost.supervisor.relay_link import RECONNECT_START, RelayLink, RelayState
from irishost.supervisor.switchboard import Switchboard
from irishost.supervisor.worker_table import WorkerTable

EXAMPLE = Path(__file__).parents[2] / "configs" / "echo.toml"


@pytest.fixture
def relay():
    server = RelayServer(0).start()
    yield server
    server.stop()


def link_to(port: int) -> RelayLink:
    config = load_config(EXAMPLE)
    config = replace(config, relay=replace(config.relay, port=port, embedded=False))
    log = ContextLog(logging.getLogger("irishost"))
    return RelayLink(config, Switchboard(config, log, WorkerTable(), lambda _: None), log)


def test_the_link_states_follow_the_connection(relay):
    link = link_to(relay.port)
    assert link.state is RelayState.STARTING

    link.connect()
    assert link.state is RelayState.CONNECTED
    assert link.listening()

    relay.stop()
    wait_for(lambda: link.state is RelayState.RECONNECTING, what="the drop noticed")
    assert not link.listening()

    link.begin_stopping()
    assert link.state is RelayState.STOPPING
    link.close()


def test_each_relay_state_shows_as_its_own_name():
    """The value is what `irishost status`, systemd's STATUS= and the metrics
    show: a host that is stopping says "stopping", not "stopped"."""
    assert [state.value for state in RelayState] == [state.name.lower() for state in RelayState]


def test_no_relay_is_a_relay_exit(relay):
    link = link_to(relay.port)
    relay.stop()
    with pytest.raises(HostError) as caught:
        link.connect()
    assert caught.value.code is Exit.RELAY
    assert link.state is RelayState.STARTING


def test_reconnect_attempts_back_off(relay):
    link = link_to(relay.port)
    assert link.retry_due(time.monotonic())

    link.retry_later("no relay")
    now = time.monotonic()
    assert not link.retry_due(now)
    assert link.retry_due(now + RECONNECT_START + 0.05)

    link.retry_later("no relay")  # the wait doubles
    now = time.monotonic()
    assert not link.retry_due(now + RECONNECT_START + 0.05)
    assert link.retry_due(now + 2 * RECONNECT_START + 0.05)
