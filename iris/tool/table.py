"""Aligned columns for terminal output, shared by ``iris ls`` and ``irishost status``."""

from __future__ import annotations


def table(rows: list[list[object]]) -> list[str]:
    """``rows`` (the first is the header) as lines of left-aligned columns."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(cells[0]))]
    return ["  ".join(map(str.ljust, row, widths)).rstrip() for row in cells]
