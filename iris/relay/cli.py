"""``iris-relay``: run the embedded relay in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .. import argtypes, codec
from ..logfmt import configure_logging, start_log_writer, tag_standard_streams
from ..version import add_version_option
from .input_guard import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_PACKET_TIMEOUT,
    DEFAULT_PARTIAL_BUDGET,
    InputLimits,
)
from .permissions import PermissionsError
from .server import (
    DEFAULT_OUTBOUND_BUDGET,
    DEFAULT_OUTBOUND_CAP,
    DEFAULT_PORT,
    DEFAULT_WRITE_DEADLINE,
    RelayServer,
)

SINGLE_NODE = (
    "iris-relay is a single-node relay and does not join networks; "
    "multi-machine deployments need the Iris relay node (iris -net NAME -rsa KEY)"
)


# Sizes are memory the relay may hold: a negative or zero one is a typo, and
# so is anything past a terabyte.
MAX_SIZE = 1 << 40
# A timeout up to a day; argtypes refuses NaN, infinities and the rest.
SECONDS = argtypes.seconds()


def _size(text: str) -> int:
    """Bytes, with an optional k/m/g suffix (64MiB, 256m), from 1 to MAX_SIZE."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    plain = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(plain[-1:], 1)
    try:
        value: int | None = int(plain[:-1] if scale > 1 else plain) * scale
    except ValueError:
        value = None
    return argtypes.check(value, 1, MAX_SIZE, text, "a size like 64MiB, in bytes")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iris-relay", description=__doc__)
    add_version_option(parser)
    parser.add_argument(
        "--port", type=argtypes.port(0), default=DEFAULT_PORT, help="TCP port (0: any free)"
    )
    parser.add_argument("--dev", action="store_true", help="accepted for parity with iris -dev")
    parser.add_argument(
        "--max-message", type=_size, default=codec.MAX_MESSAGE, help="largest message (64MiB)"
    )
    parser.add_argument(
        "--outbound-cap",
        type=_size,
        default=DEFAULT_OUTBOUND_CAP,
        help="unsent bytes after which a peer that stopped reading is dropped (256MiB)",
    )
    parser.add_argument(
        "--outbound-budget",
        type=_size,
        default=DEFAULT_OUTBOUND_BUDGET,
        metavar="SIZE",
        help="unsent bytes the relay holds for all connections together; past it, those "
        "holding the most are dropped as slow consumers (256MiB)",
    )
    parser.add_argument(
        "--write-deadline",
        type=SECONDS,
        default=DEFAULT_WRITE_DEADLINE,
        metavar="SECONDS",
        help="drop a peer that has taken none of the data waiting for it for this long, "
        f"0.001 to 86400 ({DEFAULT_WRITE_DEADLINE:g})",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=SECONDS,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that has not sent INIT by then, 0.001 to 86400 "
        f"({DEFAULT_HANDSHAKE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--packet-timeout",
        type=SECONDS,
        default=DEFAULT_PACKET_TIMEOUT,
        metavar="SECONDS",
        help="close a connection whose packet is still incomplete this long after its "
        f"first byte, 0.001 to 86400 ({DEFAULT_PACKET_TIMEOUT:g})",
    )
    parser.add_argument(
        "--partial-budget",
        type=_size,
        default=DEFAULT_PARTIAL_BUDGET,
        metavar="SIZE",
        help="bytes of incomplete packets the relay holds for all connections together; "
        "past it, those whose packets are oldest are closed (256MiB)",
    )
    parser.add_argument(
        "--metrics-port",
        type=argtypes.port(0),
        metavar="PORT",
        help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (0: any free port); "
        "a taken port is logged and the relay serves without them (off)",
    )
    parser.add_argument(
        "--permissions",
        type=Path,
        metavar="FILE",
        help="who may serve, send to, subscribe to and publish to which clusters and topics, "
        "by local user (a TOML file; see README); re-read on SIGHUP (off: anyone may do anything)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--net", help=argparse.SUPPRESS)
    parser.add_argument("--rsa", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    tag_standard_streams()  # before argparse, which may print a usage error
    parser = _parser()
    args = parser.parse_args(argv)
    if args.net is not None or args.rsa is not None:
        print(f"iris-relay: {SINGLE_NODE}", file=sys.stderr)
        return 2
    limits = InputLimits(args.handshake_timeout, args.packet_timeout, args.partial_budget)
    try:
        limits.check_fits(args.max_message)
    except ValueError as err:
        parser.error(f"--partial-budget: {err} (see --max-message)")
    configure_logging(args.log_level)
    start_log_writer()  # the relay never forks; its threads never wait on stderr
    try:
        server = RelayServer(
            args.port,
            args.max_message,
            args.outbound_cap,
            limits,
            args.metrics_port,
            args.permissions,
            args.outbound_budget,
            args.write_deadline,
        )
    except PermissionsError as err:
        print(f"iris-relay: --permissions: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(
            f"iris-relay: cannot listen on port {args.port}: {err.strerror or err}", file=sys.stderr
        )
        return 1

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.request_stop())
    if args.permissions is not None:
        signal.signal(signal.SIGHUP, lambda *_: server.reload_permissions())
    print(f"iris-relay: listening on {' and '.join(server.addresses)}", flush=True)
    server.serve_forever()
    return 0
