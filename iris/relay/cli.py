"""``iris-relay``: run the embedded relay in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys

from .. import codec
from ..logfmt import configure_logging, tag_standard_streams
from ..version import add_version_option
from .server import DEFAULT_OUTBOUND_CAP, DEFAULT_PORT, RelayServer

SINGLE_NODE = (
    "iris-relay is a single-node relay and does not join networks; "
    "multi-machine deployments need the Iris relay node (iris -net NAME -rsa KEY)"
)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(text[-1:], 1)
    try:
        return int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64MiB)") from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r} (0 to 65535)")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iris-relay", description=__doc__)
    add_version_option(parser)
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help="TCP port (0: any free)")
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
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--net", help=argparse.SUPPRESS)
    parser.add_argument("--rsa", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    tag_standard_streams()  # before argparse, which may print a usage error
    args = _parser().parse_args(argv)
    if args.net is not None or args.rsa is not None:
        print(f"iris-relay: {SINGLE_NODE}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    try:
        server = RelayServer(args.port, args.max_message, args.outbound_cap)
    except OSError as err:
        print(
            f"iris-relay: cannot listen on port {args.port}: {err.strerror or err}", file=sys.stderr
        )
        return 1

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.request_stop())
    print(f"iris-relay: listening on {' and '.join(server.addresses)}", flush=True)
    server.serve_forever()
    return 0
