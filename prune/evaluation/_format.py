"""Number formatting shared by the markdown tables of bench, eval and report."""

from __future__ import annotations

from typing import Any


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: '-' for a missing value, floats with ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
