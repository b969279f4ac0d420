"""Tunnel messages as chunks on the wire (docs/protocol.md, section 6), pure.

A message longer than the relay's chunk limit travels as several
TUN_TRANSFER chunks: the first carries the whole message's length, the
others 0. Shared by the threaded and the asyncio tunnels, so both cut and
reassemble messages the same way; neither does any I/O here.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import codec


def split(message: bytes | bytearray | memoryview, limit: int) -> Iterator[tuple[int, bytes]]:
    """The (size field, chunk) pairs of one message, in order."""
    view = memoryview(message)
    size = len(view)
    for pos in range(0, size, limit):
        yield (0 if pos else size), bytes(view[pos : pos + limit])


class Reassembly:
    """Joins the chunks of a tunnel's inbound messages.

    A first chunk arriving while a message is incomplete abandons that
    message: its sender timed out part way, and the receiver must hand the
    allowance the abandoned part used back, or the tunnel slowly starves.
    """

    __slots__ = ("tunnel_id", "_parts", "_size", "_have")

    def __init__(self, tunnel_id: int):
        self.tunnel_id = tunnel_id
        self._parts: list[bytes] = []
        self._size = 0  # the announced length of the message being received
        self._have = 0

    def add(self, size: int, chunk: bytes) -> tuple[bytes | None, int]:
        """Take one chunk; return (the completed message or None, bytes abandoned).

        Raises codec.ProtocolError for a continuation without a message, or a
        message longer than announced.
        """
        abandoned = 0
        if size:
            if self._parts:
                abandoned = self._have
            self._parts, self._size, self._have = [], size, 0
        elif not self._size:
            raise codec.ProtocolError(f"tunnel {self.tunnel_id}: continuation without a message")
        self._parts.append(chunk)
        self._have += len(chunk)
        if self._have > self._size:
            raise codec.ProtocolError(f"tunnel {self.tunnel_id}: message longer than announced")
        if self._have < self._size:
            return None, abandoned
        parts = self._parts
        self._parts, self._size, self._have = [], 0, 0
        return (parts[0] if len(parts) == 1 else b"".join(parts)), abandoned
