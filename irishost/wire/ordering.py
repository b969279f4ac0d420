"""Which memory-ordering discipline the shared-memory rings use on this machine.

A ring's fast path publishes a record by storing it and then storing the
ring's index, and relies on the CPU to make the two visible in that order.
x86-64 does (total store order); aarch64, POWER and RISC-V need fence
instructions that Python cannot issue. So the choice is made here, once,
from the machine's name: the fast path only where its soundness is
established, the kernel path everywhere else (``irishost/wire/ring.py``
says what each path orders, and how).

An operator may force the kernel path with ``IRISHOST_RING_ORDERING=kernel``;
nothing forces the fast path onto a CPU it is not sound on.
"""

from __future__ import annotations

import enum
import os
import platform
import struct

__all__ = ["ENV_VARIABLE", "ORDERING", "Ordering", "ordering_for"]

ENV_VARIABLE = "IRISHOST_RING_ORDERING"


class Ordering(enum.Enum):
    #: Shared indexes trusted as they are: sound on x86-64 only.
    TSO = "tso"
    #: Every index a peer trusts travels through an eventfd counter: sound
    #: on any CPU Linux runs on, at the price of a system call per publication.
    KERNEL = "kernel"


#: ``platform.machine()`` names of 64-bit x86: total store order, and an
#: aligned 8-byte store (the ring's indexes) is one atomic instruction.
#: 32-bit x86 is left out: there an 8-byte index may be stored in two halves.
_TSO_MACHINES = frozenset({"x86_64", "amd64"})


def ordering_for(machine: str, pointer_bits: int, requested: str | None = None) -> Ordering:
    """The ordering for a CPU named ``machine`` (``platform.machine()``) under
    a Python of ``pointer_bits`` bits (a 32-bit Python on a 64-bit x86 kernel
    still reports "x86_64"), given what the operator ``requested``
    (the environment variable's value: unset, "auto" or "kernel")."""
    if requested not in (None, "", "auto", Ordering.KERNEL.value):
        raise ValueError(f"{ENV_VARIABLE} must be 'auto' or 'kernel', got {requested!r}")
    if requested == Ordering.KERNEL.value:
        return Ordering.KERNEL
    if machine.lower() in _TSO_MACHINES and pointer_bits == 64:
        return Ordering.TSO
    return Ordering.KERNEL


#: This process's choice, made once: a ring's two sides must agree, and the
#: ring records it in its header for the side that attaches.
ORDERING = ordering_for(platform.machine(), struct.calcsize("P") * 8, os.environ.get(ENV_VARIABLE))
