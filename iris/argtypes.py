"""argparse types for the numbers on the command lines of iris, iris-relay and irishost.

One place, so the three commands refuse a bad number the same way: argparse
names the flag, the text here gives the allowed range, and the exit is 2
(``iris request: error: argument --timeout: expected seconds from 0.001 to
86400, got 'inf'``). NaN, infinities and huge values end here instead of as a
traceback (OverflowError), a hang or a memory error further in.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

# The longest wait any command accepts. Longer is a typo (1e12) rather than a
# plan, and a day is well inside what the binding and the wire carry.
DAY = 86400.0
# A timeout's least: the wire carries whole milliseconds, and the binding
# refuses less than one (iris.connection.timeout_ms).
MILLISECOND = 0.001
MAX_PORT = 65535

_Number = TypeVar("_Number", int, float)


def _show(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check(
    value: _Number | None, low: _Number, high: _Number | None, text: str, what: str
) -> _Number:
    """``value`` if it is within [low, high] (no upper bound when ``high`` is None),
    else the ArgumentTypeError argparse reports against the flag. NaN fails every
    comparison, so it is refused with the rest; None stands for text that did
    not parse."""
    if value is not None and low <= value and (high is None or value <= high):
        return value
    allowed = f"from {_show(low)} to {_show(high)}" if high is not None else f"of at least {low}"
    raise argparse.ArgumentTypeError(f"expected {what} {allowed}, got {text!r}")


def integer(low: int, high: int | None = None, what: str = "an integer") -> Callable[[str], int]:
    """A whole number in [low, high]."""

    def parse(text: str) -> int:
        try:
            value: int | None = int(text)
        except ValueError:
            value = None
        return check(value, low, high, text, what)

    return parse


def seconds(low: float = MILLISECOND, high: float = DAY) -> Callable[[str], float]:
    """A finite number of seconds in [low, high]."""

    def parse(text: str) -> float:
        try:
            value: float | None = float(text)
        except ValueError:
            value = None
        if value is not None and not math.isfinite(value):
            value = None
        return check(value, low, high, text, "seconds")

    return parse


def port(low: int = 1) -> Callable[[str], int]:
    """A TCP port; ``low`` 0 where the command takes 0 for "any free one"."""
    return integer(low, MAX_PORT, "a TCP port")
