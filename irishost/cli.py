"""``irishost -c service.toml``: run a service's handler on a pool of workers."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config
from .loader import HandlerImportError, load_handler
from .supervisor import Exit, HostError, Supervisor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irishost",
        description=__doc__,
        epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 config error, "
        "4 handler import/init error, 5 relay unreachable",
    )
    parser.add_argument("-c", "--config", required=True, help="the service's TOML file")
    parser.add_argument("--check", action="store_true", help="validate config and handler, exit")
    parser.add_argument("--workers", type=int, help="worker processes (overrides the file)")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides the file"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides = {"workers": args.workers, "log_level": args.log_level}
        config = load_config(args.config).with_overrides(**overrides)
    except ConfigError as err:
        print(f"irishost: config error: {err}", file=sys.stderr)
        return Exit.CONFIG
    logging.basicConfig(
        level=config.logging.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        handler_class = load_handler(config) if config.workers.preload or args.check else None
    except HandlerImportError as err:
        print(f"irishost: handler error: {err}", file=sys.stderr)
        if err.details:
            print(err.details, file=sys.stderr, end="")
        return Exit.HANDLER
    if args.check:
        print(f"irishost: {config.file}: OK (handler {config.service.handler})")
        return Exit.OK
    try:
        return Supervisor(config, handler_class, overrides).run()
    except HostError as err:
        if err.code != Exit.OK:
            print(f"irishost: {err}", file=sys.stderr)
            if err.details:
                print(err.details, file=sys.stderr, end="")
        return err.code
