"""iris: request, publish, subscribe, tunnel and benchmark from the shell.

Talks to the Iris relay on this machine (the embedded iris-relay, or an Iris
node), on --port (default 55555).
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Callable

import iris
from iris import argtypes, codec
from iris.connection import DEFAULT_PORT
from iris.version import add_version_option

from . import bench, keygen, messaging, pipe, status
from .exits import EPILOG, Exit, ToolError

EXAMPLES = """\
examples:
  iris reply echo --echo &                 a responder to try things with
  iris request echo hello                  prints the reply: hello
  echo -n hello | iris request echo        the request from stdin
  iris subscribe news --count 1 &          prints one event, then exits
  iris publish news "it happened"
  iris broadcast workers reload
  tar c src | iris tunnel backup > receipt stdin into a tunnel, the tunnel to stdout
  iris bench request echo --clients 4 --seconds 10
  iris bench publish news --size 1024 --count 100000
  iris bench request primes --data 200000  a payload the service understands
  iris ls                                  clusters with members, topics with subscribers
  iris relay status                        connections, traffic, budgets (--json)
  iris keygen -o /etc/iris/prod.pem        the key for iris -net prod -rsa ...
"""

# Enough for a relay on this machine to answer; a slow handler needs --timeout.
DEFAULT_TIMEOUT = 5.0


# Ranges of the numeric flags; iris.argtypes refuses the rest with exit 2.
TIMEOUT = argtypes.seconds()  # 0.001 (the wire's least) to a day
LINGER = argtypes.seconds(0.0)
# Each client is a thread with its own connection: more is a typo, not a load test.
MAX_CLIENTS = 1024


def _parser() -> argparse.ArgumentParser:
    # --port is accepted before and after the command; SUPPRESS keeps a
    # subcommand from overwriting a value given before it.
    port = argparse.ArgumentParser(add_help=False)
    port.add_argument(
        "--port", type=argtypes.port(), default=argparse.SUPPRESS, help="relay port (55555)"
    )
    timeout = argparse.ArgumentParser(add_help=False)
    timeout.add_argument(
        "--timeout",
        type=TIMEOUT,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the answer, 0.001 to 86400 ({DEFAULT_TIMEOUT:g})",
    )

    parser = argparse.ArgumentParser(
        prog="iris",
        description=__doc__,
        epilog=f"{EXAMPLES}\n{EPILOG}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version_option(parser)
    parser.add_argument(
        "--port", type=argtypes.port(), default=DEFAULT_PORT, help="relay port, 1 to 65535 (55555)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[port, *parents])

    data_help = "the message (UTF-8); read from stdin when omitted"
    sub = command("request", "send a request, print the reply (raw bytes)", timeout)
    sub.add_argument("cluster")
    sub.add_argument("data", nargs="?", help=data_help)

    sub = command("broadcast", "send a message to every member of a cluster")
    sub.add_argument("cluster")
    sub.add_argument("data", nargs="?", help=data_help)

    sub = command("publish", "publish an event to a topic")
    sub.add_argument("topic")
    sub.add_argument("data", nargs="?", help=data_help)

    sub = command("subscribe", "print a topic's events, one per line, until Ctrl-C")
    sub.add_argument("topic")
    sub.add_argument("--count", type=argtypes.integer(1), help="exit after this many events")

    sub = command("reply", "serve a cluster: answer every request, until Ctrl-C")
    sub.add_argument("cluster")
    answer = sub.add_mutually_exclusive_group(required=True)
    answer.add_argument("--echo", action="store_true", help="reply with the request itself")
    answer.add_argument("--data", help="reply with this text (UTF-8)")

    sub = command("tunnel", "stdin into a tunnel to a cluster, the tunnel to stdout", timeout)
    sub.add_argument("cluster")
    sub.add_argument(
        "--linger",
        type=LINGER,
        default=pipe.DEFAULT_LINGER,
        help="after stdin ends, wait this long for more output before closing "
        f"(seconds, 0 to 86400, {pipe.DEFAULT_LINGER:g}); Iris tunnels cannot be half-closed",
    )

    _add_bench(command("bench", "load test: rate and latency percentiles"), port, timeout)
    _inspection_commands(command, port)

    sub = command("keygen", "make a network key for Iris nodes (PKCS#1 PEM, mode 0600)")
    sub.add_argument("-o", "--output", help="write the key to this file (default: stdout)")
    sub.add_argument(
        "--bits",
        type=argtypes.integer(keygen.MIN_BITS, keygen.MAX_BITS),
        default=keygen.DEFAULT_BITS,
        help=f"{keygen.MIN_BITS} to {keygen.MAX_BITS} ({keygen.DEFAULT_BITS})",
    )
    sub.add_argument("--force", action="store_true", help="replace an existing file")
    return parser


def _add_bench(
    sub: argparse.ArgumentParser, port: argparse.ArgumentParser, timeout: argparse.ArgumentParser
) -> None:
    """``iris bench request|publish`` and their load options."""
    kinds = sub.add_subparsers(dest="kind", required=True, metavar="KIND")
    load = argparse.ArgumentParser(add_help=False)
    load.add_argument(
        "--clients",
        type=argtypes.integer(1, MAX_CLIENTS),
        default=1,
        help=f"connections, 1 to {MAX_CLIENTS} (1)",
    )
    load.add_argument(
        "--size",
        type=argtypes.integer(1, codec.MAX_MESSAGE, "bytes"),
        default=128,
        help=f"message bytes, up to the relay's limit of {codec.MAX_MESSAGE} (128)",
    )
    _payload_options(load)
    until = load.add_mutually_exclusive_group()
    until.add_argument("--seconds", type=TIMEOUT, help="run this long, 0.001 to 86400 (default 5)")
    until.add_argument("--count", type=argtypes.integer(1), help="send this many messages in all")
    bench_request = kinds.add_parser(
        "request",
        help="round trips to a cluster (serve it: iris reply CLUSTER --echo)",
        parents=[port, timeout, load],
    )
    bench_request.add_argument("cluster")
    bench_publish = kinds.add_parser(
        "publish", help="events to a topic, timed to our own subscriber", parents=[port, load]
    )
    bench_publish.add_argument("topic")


def _payload_options(load: argparse.ArgumentParser) -> None:
    """--data and --data-file of ``iris bench``: a real service needs requests
    it understands, which the generated ``x`` * --size is not."""
    given = load.add_mutually_exclusive_group()
    given.add_argument("--data", help="send this message (UTF-8) instead of --size bytes")
    given.add_argument("--data-file", metavar="PATH", help="send this file's bytes instead")


def _inspection_commands(
    command: Callable[..., argparse.ArgumentParser], port: argparse.ArgumentParser
) -> None:
    """``iris ls`` and ``iris relay status``: what the relay on the port holds,
    from its status socket (an Iris node has none)."""
    command("ls", "list the relay's clusters with members and topics with subscribers")
    relay = command("relay", "ask the relay about itself")
    what = relay.add_subparsers(dest="what", required=True, metavar="WHAT")
    shown = what.add_parser(
        "status",
        parents=[port],
        help="connections, clusters, topics, traffic, slow consumers, partial-input budget",
        description="What the relay holds and has carried, from its status socket "
        "(iris-relay and irishost's embedded relay): $RUNTIME_DIRECTORY/PORT.sock when "
        "set, else /tmp/iris-relay-UID/PORT.sock, then /run/iris-relay/PORT.sock "
        "(the shipped systemd unit's; as root).",
    )
    shown.add_argument("--json", action="store_true", help="the snapshot as JSON, keys stable")


def _run(args: argparse.Namespace) -> Exit:
    """Call the command's function with the arguments it needs."""
    if args.command == "request":
        return messaging.request(
            args.port, args.cluster, messaging.payload(args.data), args.timeout
        )
    if args.command == "broadcast":
        return messaging.broadcast(args.port, args.cluster, messaging.payload(args.data))
    if args.command == "publish":
        return messaging.publish(args.port, args.topic, messaging.payload(args.data))
    if args.command == "subscribe":
        return messaging.subscribe(args.port, args.topic, args.count)
    if args.command == "reply":
        answer = None if args.echo else args.data.encode()
        return messaging.reply(args.port, args.cluster, answer)
    if args.command == "tunnel":
        return pipe.run(args.port, args.cluster, args.timeout, args.linger)
    if args.command == "keygen":
        return keygen.run(args.output, args.bits, args.force)
    if args.command == "ls":
        return status.ls(args.port)
    if args.command == "relay":
        return status.show(args.port, args.json)
    seconds = args.seconds if args.seconds or args.count else bench.DEFAULT_SECONDS
    payload = bench.read_payload(args.data, args.data_file)
    plan = bench.Plan(args.clients, args.size, seconds, args.count, payload)
    if args.kind == "request":
        return bench.bench_requests(args.port, args.cluster, plan, args.timeout)
    return bench.bench_publish(args.port, args.topic, plan)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM ends a command the way Ctrl-C does: connections close cleanly.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run(args)
    except ToolError as err:
        messaging.note(str(err))
        return err.code
    except iris.RemoteError as err:
        messaging.note(f"remote error: {err.fault}")
        return Exit.REMOTE
    except iris.TimeoutError as err:
        messaging.note(f"timeout: {err}")
        return Exit.TIMEOUT
    except iris.ClosedError as err:
        messaging.note(f"connection closed: {err}")
        return Exit.FAILURE
    except ValueError as err:  # the binding refused an argument, e.g. an empty message
        messaging.note(str(err))
        return Exit.USAGE
    except BrokenPipeError:
        # stdout's reader went away (iris subscribe news | head -1): not an error.
        # Point stdout at /dev/null so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        return Exit.OK
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
