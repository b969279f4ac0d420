"""``irishost -c service.toml``: run a service's handler on a pool of workers.

Commands for a running host, over its control socket (found from the
config, or given with --socket):

  irishost status -c service.toml [--json]   what every worker is doing
  irishost reload -c service.toml [--wait]   re-read config and code (as SIGHUP);
                                             --wait: until it completed or failed
  irishost scale  -c service.toml 4          run 4 workers (1 to 1024)
  irishost stop   -c service.toml            stop gracefully (as SIGTERM), wait for the exit
  irishost status --socket /run/irishost/primes/primes-<hash>.sock

The socket is <config stem>-<hash of its path>.sock in $RUNTIME_DIRECTORY;
irishost status -c finds it from the config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from iris import argtypes
from iris.logfmt import (
    configure_logging,
    start_log_writer,
    stop_log_writer,
    tag_standard_streams,
)
from iris.version import add_version_option

from .config import (
    MAX_SOCKET_PATH,
    MAX_WORKERS,
    ConfigError,
    check_socket_path,
    load_config,
    parse_worker_count,
)
from .ops.control import ControlError, format_status, query_status, send_command, wait_closed
from .supervisor.loop import Exit, HostError, Supervisor
from .supervisor.spawner import check_handler


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irishost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 ok, 1 failure (for a command: no host answered, or it "
        "refused), 2 usage, 3 config error, 4 handler import/init error, 5 relay unreachable",
    )
    add_version_option(parser)
    parser.add_argument(
        "command",
        nargs="?",
        choices=["run", "status", "reload", "scale", "stop"],
        default="run",
        help="default: run",
    )
    parser.add_argument("count", nargs="?", type=_count, help="scale: the number of workers")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", help="the service's TOML file")
    where.add_argument(
        "--socket",
        type=_socket_path,
        help=f"a running host's control socket, instead of -c (at most {MAX_SOCKET_PATH} bytes)",
    )
    parser.add_argument("--check", action="store_true", help="validate config and handler, exit")
    parser.add_argument(
        "--workers", type=_count, help=f"worker processes, 1 to {MAX_WORKERS} (overrides the file)"
    )
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides the file"
    )
    parser.add_argument("--json", action="store_true", help="status: print the snapshot as JSON")
    parser.add_argument(
        "--wait",
        action="store_true",
        help="reload: return when the reload completed (exit 0) or failed (exit 1, why)",
    )
    parser.add_argument(
        "--timeout",
        type=argtypes.seconds(),
        default=60.0,
        help="stop: seconds to wait for the host to exit; reload --wait: for the reload; "
        "0.001 to 86400, so 0 is refused: stop always waits (default 60)",
    )
    return parser


def _count(text: str) -> int:
    try:
        value: int | str = int(text)
    except ValueError:
        value = text  # refused below, in the words of the config's workers.count
    try:
        return parse_worker_count(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _socket_path(text: str) -> Path:
    """A unix socket's path, checked as the config's is: a longer one made connect
    raise OSError, not a ControlError, and a traceback."""
    try:
        return check_socket_path(Path(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    tag_standard_streams()  # before argparse, which may print a usage error
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    _check_usage(parser, args)
    if args.command != "run" and args.socket is not None:
        return _command(args, args.socket)
    overrides = {"workers": args.workers, "log_level": args.log_level}
    try:
        config = load_config(args.config).with_overrides(**overrides)
    except ConfigError as err:
        return _config_error(err)
    if args.command != "run":
        return _command(args, config.control.socket)
    configure_logging(config.logging.level, file=config.logging.file)
    try:
        if args.check:
            check_handler(config)  # HostError: exit 3 or 4, as a start would
            # init runs only in a worker, with the relay: say so, lest OK read as "will start"
            return _print(
                f"irishost: {config.file}: OK: config valid; handler imported; init not run"
                f" ({config.service.handler})"
            )
        # The supervisor never forks (fork servers are exec'd), so a writer thread is safe.
        start_log_writer()
        return Supervisor(config, overrides).run()
    except HostError as err:
        if err.code != Exit.OK:
            # The log's last lines first, and not from the writer thread while
            # this is written: under journald both go through one tagging
            # stream, which tags line starts from one thread at a time.
            stop_log_writer()
            sys.stderr.write(f"irishost: {err}\n{err.details}")
        return err.code


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse option mixes argparse cannot express; exits 2 like its own errors."""
    command = args.command
    if command == "run" and args.config is None:
        parser.error("the following arguments are required: -c/--config")  # argparse's words
    if args.config is None and args.socket is None:
        parser.error(f"{command} needs -c/--config or --socket")
    if (command == "scale") != (args.count is not None):
        parser.error("scale needs a worker count (irishost scale -c FILE 4); no other command does")
    if args.json and command != "status":
        parser.error("--json is for status")
    if args.wait and command != "reload":
        parser.error("--wait is for reload")
    if command != "run" and (args.check or args.workers is not None or args.log_level):
        parser.error(f"--check, --workers and --log-level are for running a host, not {command}")


def _config_error(err: ConfigError) -> Exit:
    print(f"irishost: config error: {err}", file=sys.stderr)
    return Exit.CONFIG


def _command(args: argparse.Namespace, socket_path: Path) -> int:
    """status, reload, scale or stop, sent to the host at ``socket_path``."""
    try:
        if args.command == "status":
            snapshot = query_status(socket_path)
            return _print(json.dumps(snapshot, indent=2) if args.json else format_status(snapshot))
        command: dict[str, object] = {"cmd": args.command}
        if args.command == "scale":
            command["count"] = args.count
        if args.wait:
            command["wait"] = True
        answer = send_command(socket_path, command, args.timeout if args.wait else 5.0)
        if args.command == "stop":
            wait_closed(socket_path, args.timeout)
            return _print(f"irishost: {answer['message']}; stopped")
        return _print(f"irishost: {answer['message']}")
    except ControlError as err:
        print(f"irishost: {err}", file=sys.stderr)
        return Exit.FAILURE


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
