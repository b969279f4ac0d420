"""Serving Prometheus's text format over HTTP, on 127.0.0.1 only: the relay's and irishost's.

Both serve their numbers the same way, so the server is written once, here
(irishost imports iris, never the reverse); what each one measures and how
it renders it stays with it (iris/relay/metrics.py, irishost/ops/metrics.py).

Loopback only: the endpoint has no authentication, and a scraper on another
machine should go through a proxy that adds it. Optional: another process
holding the port (another local user can bind any free port first) must not
keep the service from starting, so :func:`serve_optionally` hands back why
not instead of raising, for the caller's one log line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# The only address served; see above.
HOST = "127.0.0.1"
# The exposition format's version, which Prometheus reads from the content type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# How quickly close() takes effect: the accept loop checks for it this often.
POLL_INTERVAL = 0.1

log = logging.getLogger(__name__)

# Makes the whole exposition text, on a request thread of the server.
Render = Callable[[], str]


class Unavailable(Exception):
    """The numbers cannot be had just now (the service is stopping, or busy):
    the scrape gets 503 and ``str()``, and the log no traceback."""


def family(name: str, kind: str, description: str) -> list[str]:
    """The HELP and TYPE lines that open a metric family."""
    return [f"# HELP {name} {description}", f"# TYPE {name} {kind}"]


def label_value(value: str) -> str:
    """``value`` quoted for a label, escaped as the format says: backslash, quote, newline.

    Names the service does not choose (clusters, topics) may hold any of them,
    and one unescaped would make the whole scrape unreadable.
    """
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class MetricsServer:
    """Serves GET /metrics on 127.0.0.1:``port`` from a daemon thread until closed.

    ``port`` 0 picks a free port; ``port`` says which one was bound. OSError
    when the port cannot be bound.
    """

    def __init__(self, port: int, render: Render, thread_name: str) -> None:
        self._server = _HTTPServer(port, render)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(POLL_INTERVAL,),
            name=thread_name,
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_optionally(
    port: int, render: Render, thread_name: str
) -> tuple[MetricsServer | None, str]:
    """The endpoint on ``port``, or None and why not, as a phrase for the caller's log."""
    try:
        return MetricsServer(port, render, thread_name), ""
    except OSError as err:
        return None, f"port {port} unavailable: {err.strerror or err}"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck scraper must not hold up the service's exit

    def __init__(self, port: int, render: Render):
        self.render = render
        super().__init__((HOST, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    # A scraper that connects and sends nothing is dropped after this long.
    timeout = 10.0
    server: _HTTPServer

    def do_GET(self) -> None:
        if self.path.partition("?")[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        try:
            body = self.server.render().encode()
        except Unavailable as err:
            self.send_error(503, str(err))
            return
        except Exception:  # the service carries on; the scrape fails visibly
            log.exception("metrics snapshot failed")
            self.send_error(500, "snapshot failed; see the service's log")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes every request to stderr, which under systemd is
        # the journal; a scrape every 15 s is not news.
        log.debug("metrics request from %s: %s", self.client_address[0], format % args)
