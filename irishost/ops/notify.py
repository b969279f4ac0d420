"""The systemd notify protocol (sd_notify(3)), spoken directly.

A Type=notify service finds a datagram socket's address in NOTIFY_SOCKET and
reports its state there as newline-separated KEY=VALUE lines. That is one
``sendto()``, so libsystemd (a C dependency often missing from virtualenvs)
would buy nothing.

Only the supervisor notifies. The unit says NotifyAccess=main, so systemd
drops datagrams from workers, which inherit the Notifier when they fork.

A failed send is logged and otherwise ignored: losing systemd's socket must
not take the service down with it. If watchdog pings stop getting through,
systemd restarts the service, which is then the right outcome anyway.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

from iris.logs import ContextLog, RateLimitedWarning

# A send not done within this long is given up on, so a wedged systemd cannot
# stall the supervisor loop. systemd's receive queue is large; in practice
# this only fires when something is already badly wrong.
SEND_TIMEOUT = 1.0
# Failed sends are logged at most this often: watchdog pings repeat every few
# seconds, and one line a minute says everything there is to say.
WARN_INTERVAL = 60.0

log = ContextLog(logging.getLogger(__name__))


class Notifier:
    """Tells systemd about the service's state; does nothing outside systemd.

    ``address`` is NOTIFY_SOCKET's value: a filesystem path, or "@name" for
    Linux's abstract namespace. None (or an address kind we do not speak,
    such as newer systemd's "vsock:...") makes every method a no-op, so callers
    never need to ask whether systemd is there.
    """

    def __init__(self, address: str | None = None, watchdog_interval: float | None = None):
        self._watchdog_interval = watchdog_interval
        self._address = _socket_address(address) if address else None
        self._sock: socket.socket | None = None
        if self._address is not None:
            # Python opens sockets close-on-exec, so programs a handler execs
            # do not inherit systemd's socket.
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.settimeout(SEND_TIMEOUT)
        self._warn = RateLimitedWarning(
            log.new(notify_socket=address), "cannot notify systemd", WARN_INTERVAL
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd asked for through NOTIFY_SOCKET and WATCHDOG_USEC."""
        return cls(environ.get("NOTIFY_SOCKET"), _watchdog_interval(environ, os.getpid()))

    def send(self, **fields: object) -> None:
        """Send the fields in one datagram, e.g. ``send(READY=1, STATUS="...")``."""
        sock, address = self._sock, self._address
        if sock is None or address is None:  # no systemd (neither is set), or closed
            return
        message = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            # "replace": a stray surrogate in a status text must not raise either.
            sock.sendto(message.encode(errors="replace"), address)
        except OSError as err:
            self._warn(error=err.strerror or str(err))

    def tell_ready(self) -> None:
        self.send(READY=1)

    def tell_reloading(self) -> None:
        """Start a reload; Type=notify-reload needs the timestamp in the same datagram."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def tell_stopping(self) -> None:
        self.send(STOPPING=1)

    def tell_status(self, text: str) -> None:
        self.send(STATUS=text)

    def ping_watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings, or None when systemd wants none.

        Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises, so one late
        ping does not get the service killed.
        """
        return self._watchdog_interval

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value: object) -> str:
    # A value cannot span lines in this protocol; status texts are often built
    # from exception messages, and flattening them beats losing them.
    return str(value).replace("\n", " ")


def _socket_address(value: str) -> str | None:
    if value.startswith("/"):
        return value
    if value.startswith("@"):
        return "\0" + value[1:]
    log.warning("unsupported NOTIFY_SOCKET; not notifying systemd", notify_socket=value)
    return None


def _watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    # WATCHDOG_PID names the process the watchdog is meant for; a process that
    # inherited the environment from it must not ping on its behalf.
    try:
        if "WATCHDOG_PID" in environ and int(environ["WATCHDOG_PID"]) != pid:
            return None
        usec = int(environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None
