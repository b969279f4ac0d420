"""Limits on what the relay holds for peers that have not finished sending.

Three ways a local peer could pin the relay's resources without breaking a
single protocol rule, each with a bound:

- handshake deadline: a connection that has not completed INIT in time is
  closed (half an INIT would otherwise hold it forever);
- packet deadline: a packet whose first byte arrived too long ago and is
  still incomplete closes its connection (a 64 MiB publish announced and
  never finished would otherwise pin its buffer forever);
- partial budget: the bytes of incomplete packets, summed over every
  connection, stay under a relay-wide budget; past it the connections whose
  partial packets are oldest are closed until the total fits again. On
  loopback a healthy sender delivers a whole message in milliseconds, so
  the oldest partial packets are the stalled ones; a fast sender that
  happens to overlap them is spared.

The guard knows nothing of sockets. The server reports each read's outcome
with :meth:`InputGuard.received` (only when a partial packet is involved,
which costs nothing on the common path) and calls :meth:`InputGuard.overdue`
on its housekeeping tick, so there is no timer per packet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .. import codec

# A client sends INIT as its first bytes; ten seconds covers a loaded machine.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# A maximum-size message crosses loopback in well under a second; thirty
# seconds covers a sender descheduled on a badly overloaded machine.
DEFAULT_PACKET_TIMEOUT = 30.0
# Room for four maximum-size messages arriving at the same moment, the same
# as one peer's outbound cap.
DEFAULT_PARTIAL_BUDGET = 256 * 1024 * 1024
# The housekeeping tick runs this often while anything is watched, or more
# often when a deadline is shorter, so a deadline is met within a quarter of
# itself.
MAX_TICK_SECONDS = 1.0


@dataclass(frozen=True)
class InputLimits:
    """The three bounds, validated when built; see the module docstring."""

    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    packet_timeout: float = DEFAULT_PACKET_TIMEOUT
    partial_budget: int = DEFAULT_PARTIAL_BUDGET

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "packet_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")

    def check_fits(self, max_message: int) -> None:
        """Raise ValueError unless one largest packet fits in the budget.

        A smaller budget would close every connection that sends a message
        of the largest size the relay accepts.
        """
        largest = max_message + codec.PACKET_OVERHEAD
        if self.partial_budget < largest:
            raise ValueError(
                f"partial budget of {self.partial_budget} bytes is smaller than the largest "
                f"packet ({max_message} bytes of message + {codec.PACKET_OVERHEAD} of headers)"
            )

    @property
    def tick(self) -> float:
        """How often the deadlines are checked while anything is watched."""
        return min(MAX_TICK_SECONDS, self.handshake_timeout / 4, self.packet_timeout / 4)


class Watched(Protocol):
    """The guard's view of a connection; see server.PeerConnection."""

    cluster: str | None  # None until INIT
    closing: bool
    partial: int  # bytes of an incomplete packet, as last reported; kept by the guard


_Conn = TypeVar("_Conn", bound=Watched)


class InputGuard(Generic[_Conn]):
    """Tracks handshakes and partial packets; says which connections to close.

    Generic in the server's connection type, which is what it hands back.
    """

    def __init__(self, limits: InputLimits) -> None:
        self.limits = limits
        self.partial_total = 0
        # Both dicts are in deadline order: every entry has the same timeout,
        # and a partial packet that starts anew is moved to the end.
        self._handshakes: dict[_Conn, float] = {}  # connection -> accepted at
        self._partials: dict[_Conn, float] = {}  # connection -> its packet started at

    @property
    def watching(self) -> bool:
        """Whether any deadline is pending, i.e. the tick must run."""
        return bool(self._handshakes or self._partials)

    def accepted(self, peer: _Conn, now: float) -> None:
        self._handshakes[peer] = now

    def received(self, peer: _Conn, buffered: int, completed: bool, now: float) -> list[_Conn]:
        """Note a read that left ``buffered`` bytes of an incomplete packet.

        ``completed`` says whether the read finished at least one packet, in
        which case what is buffered belongs to a packet that started now.
        Call it when ``buffered`` or ``peer.partial`` is non-zero. Returns
        the connections to close because the budget is exceeded, oldest
        partial packet first (possibly ``peer`` itself).
        """
        self.partial_total += buffered - peer.partial
        peer.partial = buffered
        partials = self._partials
        if not buffered:
            partials.pop(peer, None)
        elif completed or peer not in partials:
            partials.pop(peer, None)
            partials[peer] = now
        if self.partial_total <= self.limits.partial_budget:
            return []
        over = self.partial_total - self.limits.partial_budget
        offenders: list[_Conn] = []
        for offender in partials:  # oldest first
            offenders.append(offender)
            over -= offender.partial
            if over <= 0:
                break
        return offenders

    def forget(self, peer: _Conn) -> None:
        """The connection is closing: its buffered bytes no longer count."""
        self._handshakes.pop(peer, None)
        if self._partials.pop(peer, None) is not None:
            self.partial_total -= peer.partial
        peer.partial = 0

    def overdue(self, now: float) -> list[tuple[_Conn, str]]:
        """Connections past a deadline, each with the reason to close it."""
        found: list[tuple[_Conn, str]] = []
        limits, handshakes = self.limits, self._handshakes
        while handshakes:
            peer = next(iter(handshakes))
            if peer.cluster is None and not peer.closing:
                if now - handshakes[peer] < limits.handshake_timeout:
                    break  # the rest were accepted later
                found.append((peer, f"no handshake within {limits.handshake_timeout:g} s"))
            del handshakes[peer]
        for peer, started in self._partials.items():
            if now - started < limits.packet_timeout:
                break  # the rest started later
            found.append(
                (peer, f"packet not completed within {limits.packet_timeout:g} s of its start")
            )
        return found
