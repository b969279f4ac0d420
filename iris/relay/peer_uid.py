"""Which local user owns the other end of a loopback TCP connection.

TCP carries no credentials (SO_PEERCRED is for unix sockets), but both ends
of a loopback connection are sockets of this machine, and Linux knows the
owner of each: the client's socket is the one whose local address is the
relay's peer address and whose remote address is the relay's own end.

Two ways to ask, the same answer:

- the kernel's socket diagnostics (netlink ``NETLINK_SOCK_DIAG``, what
  ``ss`` uses), asked for that one socket by its addresses: a few
  microseconds, whatever else the machine has open;
- /proc/net/tcp and /proc/net/tcp6, which list every socket of the machine
  with its uid. Reading them costs in proportion to all those sockets (15 ms
  with 1000 connections open on a loaded two-core machine, BENCHMARKS.md),
  so they are the fallback, where the diagnostics are not available (a
  kernel without them, a sandbox that blocks netlink); one read answers all
  the connections one accept() turn took.

Only an ESTABLISHED socket counts: one in TIME_WAIT is listed with uid 0,
whoever owned it.
"""

from __future__ import annotations

import itertools
import socket
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

# A socket address as the socket module gives it: (host, port) for IPv4,
# (host, port, flowinfo, scope_id) for IPv6.
Address = tuple[str, int] | tuple[str, int, int, int]
# (the client's address, the relay's address) of one connection.
Ends = tuple[Address, Address]

TABLES = {socket.AF_INET: Path("/proc/net/tcp"), socket.AF_INET6: Path("/proc/net/tcp6")}
ESTABLISHED = 1
# Fields of a table line after its local address: remote address, state,
# queues, timer, retransmits, then the uid.
_UID_FIELD = 6

# linux/netlink.h, linux/sock_diag.h and linux/inet_diag.h.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NO_COOKIE = 0xFFFFFFFF
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
# inet_diag_req_v2 up to its socket id: family, protocol, extensions, pad, states.
_REQUEST = struct.Struct("=BBBBI")
_PORTS = struct.Struct("!HH")  # the socket id's ports, in network order
_TAIL = struct.Struct("=III")  # the socket id's interface and cookie
# inet_diag_msg: family, state, timer, retransmits, the 48-byte socket id,
# expires, read queue, write queue, then the uid.
_STATE_AT = _HEADER.size + 1
_UID_AT = _HEADER.size + 4 + 48 + 12
_DIAG_TIMEOUT = 1.0


def _family(address: Address) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address[0] else socket.AF_INET


class OwnerFinder:
    """Finds the owners of connections' client sockets; one per relay, closed with it."""

    def __init__(self) -> None:
        try:
            self._diag: socket.socket | None = socket.socket(
                socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG
            )
            self._diag.settimeout(_DIAG_TIMEOUT)
        except (OSError, AttributeError):  # AttributeError: no AF_NETLINK here
            self._diag = None
        self._sequence = itertools.count(1)

    @property
    def method(self) -> str:
        return "/proc/net/tcp" if self._diag is None else "sock_diag"

    def owners(self, connections: Iterable[Ends]) -> dict[Ends, int | None]:
        """The owner uid of the client's socket of each connection; None
        where it cannot be found (the client has gone already)."""
        if self._diag is None:
            return owners_in_tables(connections)
        return {ends: self._ask(self._diag, ends) for ends in connections}

    def _ask(self, diag: socket.socket, ends: Ends) -> int | None:
        client, relay = ends
        family = _family(client)
        request = b"".join(
            (
                _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF),
                _PORTS.pack(client[1], relay[1]),
                socket.inet_pton(family, client[0]).ljust(16, b"\0"),
                socket.inet_pton(family, relay[0]).ljust(16, b"\0"),
                _TAIL.pack(0, NO_COOKIE, NO_COOKIE),
            )
        )
        sequence = next(self._sequence) & 0xFFFFFFFF
        header = _HEADER.pack(
            _HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, sequence, 0
        )
        try:
            diag.send(header + request)
            while True:  # past any late answer to an earlier question
                answer = diag.recv(4096)
                if _HEADER.unpack_from(answer)[3] == sequence:
                    break
        except OSError:
            return None
        if _HEADER.unpack_from(answer)[1] == NLMSG_ERROR or len(answer) < _UID_AT + 4:
            return None  # ENOENT: no such socket
        if answer[_STATE_AT] != ESTABLISHED:
            return None
        uid: int = struct.unpack_from("=I", answer, _UID_AT)[0]
        return uid

    def close(self) -> None:
        if self._diag is not None:
            self._diag.close()


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
    needle = f" {table_address(client)} {table_address(relay)} {ESTABLISHED:02X} "
    at = table.find(needle)
    if at < 0:
        return None
    line_end = table.find("\n", at)
    fields = table[at : None if line_end < 0 else line_end].split()
    return int(fields[_UID_FIELD])


def owners_in_tables(connections: Iterable[Ends]) -> dict[Ends, int | None]:
    """:meth:`OwnerFinder.owners` from /proc/net/tcp(6), each read once."""
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
