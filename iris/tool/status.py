"""``iris ls`` and ``iris relay status``: what the relay on the port holds, from its status socket.

The relay's status socket (iris/relay/status.py) is found from the port.
An original Iris node has none, and these commands say so in one line.
The same look-up tells a request that timed out for want of a member from
one whose handler was slow (``members``).
"""

from __future__ import annotations

import json
import socket

from ..relay.status import NoStatusSocket, Snapshot, StatusError, query
from .exits import Exit, ToolError, relay_unreachable
from .table import table


def fetch(port: int) -> Snapshot:
    """The relay's snapshot; ToolError naming why there is none."""
    try:
        return query(port)
    except NoStatusSocket as err:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        except OSError as refused:
            raise relay_unreachable(port, refused) from None
        raise ToolError(
            Exit.FAILURE,
            f"the relay on port {port} serves no status ({err}): an Iris node has none; "
            "iris-relay and irishost's embedded relay do",
        ) from None
    except StatusError as err:
        raise ToolError(Exit.FAILURE, str(err)) from None


def members(port: int, cluster: str) -> int | None:
    """How many members the relay on ``port`` has under ``cluster``; None when it
    cannot say (an Iris node, a status socket of another user)."""
    try:
        return int(query(port)["clusters"].get(cluster, 0))
    except (StatusError, KeyError, TypeError, AttributeError, ValueError):
        return None


def no_member_line(cluster: str) -> str:
    return f"no member is registered under {cluster!r}"


def ls(port: int) -> Exit:
    """Print the clusters with their member counts and the topics with their subscribers'."""
    snapshot = fetch(port)
    for kind, names, counted in (
        ("CLUSTER", snapshot["clusters"], "MEMBERS"),
        ("TOPIC", snapshot["topics"], "SUBSCRIBERS"),
    ):
        rows: list[list[object]] = [[kind, counted], *map(list, sorted(names.items()))]
        if len(rows) == 1:
            rows.append([f"(no {kind.lower()}s)", ""])
        print("\n".join(table(rows)))
        if kind == "CLUSTER":
            print()
    return Exit.OK


def show(port: int, as_json: bool) -> Exit:
    """Print the whole snapshot: as it is with ``as_json``, else as a summary."""
    snapshot = fetch(port)
    if as_json:
        print(json.dumps(snapshot, indent=2, sort_keys=True))
        return Exit.OK
    causes = ", ".join(f"{n} {cause}" for cause, n in snapshot["slow_consumer_causes"].items() if n)
    causes = f" ({causes})" if causes else ""
    summary = [
        ("relay", f"{snapshot['server']} {snapshot['version']} (pid {snapshot['pid']})"),
        ("port", snapshot["port"]),
        ("uptime", f"{snapshot['uptime']:.0f} s"),
        ("connections", snapshot["connections"]),
        ("clusters", f"{len(snapshot['clusters'])} ({sum(snapshot['clusters'].values())} members)"),
        ("topics", f"{len(snapshot['topics'])} ({sum(snapshot['topics'].values())} subscribers)"),
        ("pending", f"{snapshot['pending']} requests"),
        ("in", f"{snapshot['in_msgs']} packets, {snapshot['in_bytes']} bytes"),
        ("out", f"{snapshot['out_msgs']} packets, {snapshot['out_bytes']} bytes"),
        ("slow", f"{snapshot['slow_consumers']} consumers dropped for not reading{causes}"),
        ("unsent", f"{snapshot['unsent_bytes']} of {snapshot['outbound_budget']} bytes"),
        ("partial", f"{snapshot['partial_bytes']} of {snapshot['partial_budget']} bytes"),
        ("permissions", snapshot["permissions"] or "none: every local user may do anything"),
        ("refused", ", ".join(f"{n} {action}" for action, n in snapshot["refusals"].items())),
    ]
    print("\n".join(f"{name + ':':<13}{value}" for name, value in summary))
    return Exit.OK
