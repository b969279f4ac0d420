"""Resource caps on what a registered service or a subscription accepts.

The relay pushes work at a binding as fast as senders produce it; without caps
a slow handler would let inbound messages pile up in memory without bound.
Unset (zero) fields take the defaults of the official bindings, docs/protocol.md
section 7.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import TypeVar

MiB = 1024 * 1024

# Handlers are expected to block on I/O now and then, hence more threads than cores.
DEFAULT_THREADS = 4 * (os.cpu_count() or 1)
# Bytes of inbound messages allowed to wait for a handler, per pool.
DEFAULT_MEMORY = 64 * MiB
# Inbound allowance a binding grants each tunnel.
TUNNEL_BUFFER = 64 * MiB


_Limits = TypeVar("_Limits", "ServiceLimits", "TopicLimits")


def _with_defaults(limits: _Limits, default: int, memory_default: int) -> _Limits:
    """Replace every zero field with its default; reject negatives."""
    changes: dict[str, int] = {}
    for field in fields(limits):
        value = getattr(limits, field.name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{field.name} must be a non-negative int, got {value!r}")
        if value == 0:
            changes[field.name] = memory_default if field.name.endswith("memory") else default
    return replace(limits, **changes)


@dataclass(frozen=True)
class ServiceLimits:
    """Thread and memory caps of a registered service's inbound traffic."""

    broadcast_threads: int = 0
    broadcast_memory: int = 0
    request_threads: int = 0
    request_memory: int = 0

    def with_defaults(self) -> ServiceLimits:
        return _with_defaults(self, DEFAULT_THREADS, DEFAULT_MEMORY)


@dataclass(frozen=True)
class TopicLimits:
    """Thread and memory caps of one topic subscription's inbound events."""

    event_threads: int = 0
    event_memory: int = 0

    def with_defaults(self) -> TopicLimits:
        return _with_defaults(self, DEFAULT_THREADS, DEFAULT_MEMORY)
