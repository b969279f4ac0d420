"""The supervisor's link to the relay: start or find it, register, resubscribe.

Whether the host is starting, connected, reconnecting or stopping is one
:class:`RelayState`, kept here. The connection closes on its own reader
thread when the relay goes away; :attr:`RelayLink.state` notices that the
next time it is read. Reconnecting waits with a backoff between attempts.
"""

from __future__ import annotations

import enum
import socket
import time
from collections.abc import Iterable

import iris
from iris.logs import ContextLog
from iris.relay import RelayServer
from iris.relay.permissions import PermissionsError

from ..config import Config, TopicSection
from ..exits import Exit, HostError
from .switchboard import Switchboard

# Reconnect backoff when the relay goes away. The relay is always on this
# machine (loopback), so a probe costs next to nothing: the cap keeps the
# host serving within about a second of the relay's port opening again.
RECONNECT_START, RECONNECT_CAP = 0.1, 1.0
# How long stop_relay waits for the relay to see the host's own connections close.
SETTLE_SECONDS, SETTLE_STEP = 1.0, 0.05


class RelayState(enum.StrEnum):
    """Where the host stands with the relay. Each value is its name in lower
    case: `irishost status`, STATUS= and the metrics show it as it is."""

    STARTING = "starting"  # not registered yet
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # the relay dropped us; fresh workers will register again
    STOPPING = "stopping"  # the host is stopping: no reconnect


class RelayLink:
    def __init__(self, config: Config, switchboard: Switchboard, log: ContextLog):
        self.config = config
        self.switchboard = switchboard
        self.log = log
        self.relay: RelayServer | None = None  # the embedded relay, when this host started it
        self.conn: iris.Connection | None = None
        self._state = RelayState.STARTING
        self._retry_at = 0.0
        self._delay = RECONNECT_START

    @property
    def state(self) -> RelayState:
        if self._state is RelayState.CONNECTED and self.conn is not None and self.conn.closed:
            self._state = RelayState.RECONNECTING
        return self._state

    def begin_stopping(self) -> None:
        """The host is stopping: no reconnect from now on."""
        self._state = RelayState.STOPPING

    def ensure_relay(self) -> None:
        """Wait for the relay to listen, or embed one, as ``[relay] embedded`` says.

        ``true`` embeds one and refuses a port another relay holds: this
        host would otherwise depend on a relay it does not own. ``"auto"``
        uses a relay already listening and embeds one only when none is;
        ``false`` only waits for one. ``metrics_port`` and ``permissions``
        are an embedded relay's only: another relay is not this host's to
        configure. Its bounds on slow consumers (outbound cap and budget,
        write deadline) are not keys: the relay's defaults already keep its
        buffers within about 512 MiB, whatever the host's clients do.
        """
        port, embedded = self.config.relay.port, self.config.relay.embedded
        metrics_port = self.config.relay.metrics_port or None  # 0: off
        permissions = self.config.relay.permissions
        deadline = time.monotonic() + self.config.relay.connect_timeout
        while embedded is True or not self.listening():
            if embedded:
                try:
                    self.relay = RelayServer(
                        port, metrics_port=metrics_port, permissions=permissions
                    ).start()
                    self.log.info("started embedded relay", port=self.relay.port)
                    return
                except PermissionsError as err:  # changed since the config was read
                    raise HostError(Exit.CONFIG, f"relay.permissions: {err}") from err
                except OSError as err:
                    if embedded is True:
                        raise HostError(
                            Exit.RELAY,
                            f"cannot start the embedded relay on port {port}: {err}"
                            ' (another relay there? embedded = "auto" uses it)',
                        ) from err
                    # "auto" lost a race with another relay starting: use that one
                    self.log.info("embedded relay did not start; using the one there")
            if time.monotonic() >= deadline:
                raise HostError(Exit.RELAY, f"no Iris relay is listening on port {port}")
            time.sleep(0.1)
        self.log.info("using the relay already listening", port=port)
        for key, value in (("metrics_port", metrics_port), ("permissions", permissions)):
            if value is not None:
                self.log.warning(
                    f"relay.{key} ignored: the relay on the port is not this host's",
                    **{key: value},
                )

    def listening(self) -> bool:
        with socket.socket() as probe:
            probe.settimeout(1.0)
            return probe.connect_ex(("127.0.0.1", self.config.relay.port)) == 0

    def connect(self) -> None:
        """Register the cluster member that fans work out to the workers."""
        config = self.config
        try:
            self.conn = iris.Connection(
                config.relay.port, config.service.cluster, self.switchboard.attach, self.log
            )
            self.subscribe(config.topics)
        except (OSError, iris.ClosedError) as err:
            raise HostError(
                Exit.RELAY, f"cannot register with the relay on port {config.relay.port}: {err}"
            ) from err
        self._state = RelayState.CONNECTED
        self._delay = RECONNECT_START

    def subscribe(self, topics: Iterable[TopicSection]) -> None:
        conn = self.conn
        assert conn is not None, "subscribing before the relay is connected"
        for topic in topics:
            conn.subscribe(
                topic.name,
                self.switchboard.event(topic.name),
                iris.TopicLimits(event_threads=1, event_memory=topic.event_memory),
            )

    def reconfigure(self, config: Config) -> None:
        """Follow a reload's topics: unsubscribe the dropped ones, subscribe the new."""
        old_topics = {t.name for t in self.config.topics}
        self.config = config
        if self.relay is not None and config.relay.permissions is not None:
            self.relay.reload_permissions()
        if self.state is RelayState.CONNECTED:
            assert self.conn is not None  # connected: the connection is set
            for topic in old_topics - {t.name for t in config.topics}:
                self.conn.unsubscribe(topic)
            self.subscribe(t for t in config.topics if t.name not in old_topics)

    def drop_told(self) -> bool:
        """Whether every worker has been told of the lost connection's drop.

        Fresh workers must wait for it: one forked earlier could be told too.
        """
        return self.switchboard.dropped is self.conn

    def retry_due(self, now: float) -> bool:
        return now >= self._retry_at

    def may_reconnect(self, now: float) -> bool:
        """Whether the backoff has passed and the relay listens again; if it
        does not, the next try waits longer."""
        if not self.retry_due(now):
            return False
        if not self.listening():
            self.retry_later(f"no Iris relay is listening on port {self.config.relay.port}")
            return False
        return True

    def retry_later(self, why: str) -> None:
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(2 * self._delay, RECONNECT_CAP)
        self.log.warning("relay unreachable; retrying", error=why)

    def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close()

    def stop_relay(self) -> None:
        """Stop the embedded relay, if this host started it.

        Called once the host's own connection is closed and its workers are
        gone, so the connections the relay still holds are other clients',
        which lose their relay now: the log says how many, as they will only
        see "relay shutting down".
        """
        if self.relay is None:
            return
        others = _settled_connections(self.relay)
        if others:
            self.log.warning(
                "stopping the embedded relay with other clients attached; they are cut off",
                clients=others,
                port=self.relay.port,
            )
        self.relay.stop()


def _settled_connections(relay: RelayServer) -> int:
    """The relay's open connections once the host's own are seen to be gone.

    The relay notices closed sockets on its own thread, a moment after the
    workers died; counting too early would count them as other clients.
    """
    deadline = time.monotonic() + SETTLE_SECONDS
    count = _open_connections(relay)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_STEP)
        count, before = _open_connections(relay), count
        if count == before:
            break
    return count


def _open_connections(relay: RelayServer) -> int:
    return sum(1 for peer in list(relay.peers) if not peer.closing)
