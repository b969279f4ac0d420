"""Which local user owns the other end of a loopback TCP connection.

TCP carries no credentials (SO_PEERCRED is for unix sockets), but both ends
of a loopback connection are sockets of this machine, and Linux lists every
socket with its owner's uid in /proc/net/tcp and /proc/net/tcp6. The
client's socket is the line whose local address is the relay's peer address
and whose remote address is the relay's own end. Only an ESTABLISHED line
counts: a socket in TIME_WAIT is listed with uid 0, whoever owned it.

One read of the table answers any number of connections, so the relay
looks up all the connections one accept() call took at once; the table
holds every socket of the machine, so one read costs in proportion to
them (BENCHMARKS.md has the figures).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterable
from pathlib import Path

# A socket address as the socket module gives it: (host, port) for IPv4,
# (host, port, flowinfo, scope_id) for IPv6.
Address = tuple[str, int] | tuple[str, int, int, int]
# (the client's address, the relay's address) of one connection.
Ends = tuple[Address, Address]

TABLES = {socket.AF_INET: Path("/proc/net/tcp"), socket.AF_INET6: Path("/proc/net/tcp6")}
ESTABLISHED = "01"
# Fields of a table line after its local address: remote address, state,
# queues, timer, retransmits, then the uid.
_UID_FIELD = 6


def _family(address: Address) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address[0] else socket.AF_INET


def table_address(address: Address) -> str:
    """``address`` as the kernel writes it in /proc/net/tcp(6): each 32-bit
    word of the address in the machine's byte order, then the port, in hex."""
    family = _family(address)
    packed = socket.inet_pton(family, address[0])
    words = "".join(
        f"{int.from_bytes(packed[i : i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4)
    )
    return f"{words}:{address[1]:04X}"


def owner_in_table(table: str, ends: Ends) -> int | None:
    """The uid that owns the client's socket of ``ends`` by the text of its
    family's table, or None if no established socket matches."""
    client, relay = ends
    needle = f" {table_address(client)} {table_address(relay)} {ESTABLISHED} "
    at = table.find(needle)
    if at < 0:
        return None
    line_end = table.find("\n", at)
    fields = table[at : None if line_end < 0 else line_end].split()
    return int(fields[_UID_FIELD])


def socket_owners(connections: Iterable[Ends]) -> dict[Ends, int | None]:
    """The owner uid of the client's socket of each connection, None where
    it cannot be found (the client has gone, or the table is unreadable);
    each table is read once."""
    tables: dict[socket.AddressFamily, str] = {}
    owners: dict[Ends, int | None] = {}
    for ends in connections:
        family = _family(ends[0])
        if family not in tables:
            try:
                tables[family] = TABLES[family].read_text()
            except OSError:
                tables[family] = ""
        owners[ends] = owner_in_table(tables[family], ends)
    return owners
