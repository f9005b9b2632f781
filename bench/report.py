"""Markdown helpers for the benchmark report."""

from __future__ import annotations

import math


def table(headers: list[str], rows: list[list]) -> str:
    """Return a GitHub-flavoured Markdown table; floats keep the precision they were formatted with."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def number(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def spread(values: list[float], digits: int = 1) -> str:
    """Return 'median (min-max)' of repeated measurements."""
    import statistics

    values = [value for value in values if value is not None and not math.isnan(value)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return number(values[0], digits)
    return f"{number(statistics.median(values), digits)} ({number(min(values), digits)}–{number(max(values), digits)})"


def verdict(met: bool | None) -> str:
    if met is None:
        return "not measured"
    return "met" if met else "**not met**"
