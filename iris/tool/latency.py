"""The figures a benchmark reports: rate, latency percentiles, a text histogram."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import TypeVar

_Sample = TypeVar("_Sample", int, float)

# Width of the longest histogram bar, in characters.
BAR_WIDTH = 40
PERCENTILES = (50, 90, 99)
# Histogram bucket upper bounds in nanoseconds: 1-2-5 steps from 1 us to
# 500 s, so the labels read as round numbers (200us, 1ms, 5ms).
BUCKETS = [step * 10**exponent for exponent in range(3, 12) for step in (1, 2, 5)]


def format_duration(nanoseconds: float) -> str:
    """Three significant figures in the unit that suits: 850ns, 212us, 1.43ms, 2.10s."""
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if nanoseconds >= scale:
            value = nanoseconds / scale
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.3g}{unit}"
    return f"{nanoseconds:.0f}ns"


def format_bytes(count: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f} B"


def nearest_rank(sorted_samples: Sequence[_Sample], fraction: float) -> _Sample:
    """Nearest-rank percentile: the smallest sample with ``fraction`` of them at or below it."""
    rank = max(1, math.ceil(fraction * len(sorted_samples)))
    return sorted_samples[rank - 1]


class Latencies:
    """Latency samples in nanoseconds, sorted once for the percentiles."""

    def __init__(self, samples: list[int]):
        self.samples = sorted(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def percentile(self, p: float) -> int:
        """Nearest-rank percentile: the smallest sample with ``p``% at or below it."""
        return nearest_rank(self.samples, p / 100)

    def summary(self) -> str:
        parts = [f"p{p} {format_duration(self.percentile(p))}" for p in PERCENTILES]
        return "  ".join([*parts, f"max {format_duration(self.samples[-1])}"])

    def histogram(self) -> list[str]:
        """One line per bucket (``<= 500us  1,234  ####``), fastest sample to slowest."""
        counts = [0] * len(BUCKETS)
        for sample in self.samples:  # past the last bound: counted in the last bucket
            counts[min(bisect.bisect_left(BUCKETS, sample), len(BUCKETS) - 1)] += 1
        used = [i for i, count in enumerate(counts) if count]
        tallest = max(counts)
        width = len(f"{tallest:,}")
        lines = []
        for i in range(used[0], used[-1] + 1):
            bound, count = BUCKETS[i], counts[i]
            bar = "#" * math.ceil(count / tallest * BAR_WIDTH)
            lines.append(f"  <= {format_duration(bound):>5}  {count:>{width},}  {bar}")
        return lines


def rate_line(what: str, count: int, seconds: float, size: int, failed: int) -> str:
    """Totals and rates: ``12,000 requests in 2.00 s: 6,000/s, 750 KiB/s, 0 failed``."""
    rate = count / seconds if seconds > 0 else 0.0
    return (
        f"{count:,} {what} in {seconds:.2f} s: {rate:,.0f}/s, "
        f"{format_bytes(rate * size)}/s, {failed:,} failed"
    )


def latency_lines(label: str, latencies: Latencies) -> list[str]:
    """The percentiles line, then the histogram; nothing without samples."""
    if not latencies:
        return []
    return [f"{label}: {latencies.summary()}", "", *latencies.histogram()]
