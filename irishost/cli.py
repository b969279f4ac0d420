"""``irishost -c service.toml``: run a service's handler on a pool of workers.

``irishost status -c service.toml`` asks the running host, over its control
socket, what every worker is doing.
"""

from __future__ import annotations

import argparse
import os
import sys

from iris.logfmt import configure_logging, tag_standard_streams
from iris.version import add_version_option

from .config import ConfigError, load_config
from .control import ControlError, format_status, query_status
from .loader import HandlerImportError, load_handler
from .supervisor import Exit, HostError, Supervisor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irishost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 config error, "
        "4 handler import/init error, 5 relay unreachable",
    )
    add_version_option(parser)
    parser.add_argument(
        "command", nargs="?", choices=["run", "status"], default="run", help="default: run"
    )
    parser.add_argument("-c", "--config", required=True, help="the service's TOML file")
    parser.add_argument("--check", action="store_true", help="validate config and handler, exit")
    parser.add_argument("--workers", type=int, help="worker processes (overrides the file)")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides the file"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    tag_standard_streams()  # before argparse, which may print a usage error
    args = _parser().parse_args(argv)
    overrides = {"workers": args.workers, "log_level": args.log_level}
    try:
        config = load_config(args.config).with_overrides(**overrides)
    except ConfigError as err:
        print(f"irishost: config error: {err}", file=sys.stderr)
        return Exit.CONFIG
    if args.command == "status":
        return _status(config.control.socket)
    configure_logging(config.logging.level)
    try:
        handler_class = load_handler(config) if config.workers.preload or args.check else None
    except HandlerImportError as err:
        print(f"irishost: handler error: {err}", file=sys.stderr)
        if err.details:
            print(err.details, file=sys.stderr, end="")
        return Exit.HANDLER
    if args.check:
        return _print(f"irishost: {config.file}: OK (handler {config.service.handler})")
    try:
        return Supervisor(config, handler_class, overrides).run()
    except HostError as err:
        if err.code != Exit.OK:
            print(f"irishost: {err}", file=sys.stderr)
            if err.details:
                print(err.details, file=sys.stderr, end="")
        return err.code


def _status(socket_path) -> int:
    try:
        status = format_status(query_status(socket_path))
    except ControlError as err:
        print(f"irishost: {err}", file=sys.stderr)
        return Exit.FAILURE
    return _print(status)


def _print(text: str) -> Exit:
    """Print ``text``; if the reader has gone (``irishost status | head -1``), exit
    quietly with 1, as other command-line tools do, rather than with a traceback.
    """
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The interpreter flushes stdout again on the way out, and would report
        # that failure too; writes to /dev/null succeed.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.FAILURE
    return Exit.OK
