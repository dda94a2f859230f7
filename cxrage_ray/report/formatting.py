"""How the report shows numbers: a value of analysis.json -> the short text of a table cell or plot title.

In:  None, floats (ages, ratios, p-values), ints, or any other value (shown as its text).
Out: plain, unescaped strings. Escaping is the template's job (autoescape), so these are safe to use in
     matplotlib titles as well as page cells.
"""

from __future__ import annotations

from typing import Any

#: What a missing number shows as.
MISSING = "–"


def format_value(value: Any, digits: int = 2) -> str:
    """`digits` decimals for floats (scientific below 0.001, so tiny values do not read as 0), text otherwise."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        if abs(value) < 1e-3 and value != 0:
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def format_p_value(p: float | None) -> str | None:
    """A p-value cell: 3 decimals, scientific below 0.001, '< 1e-300' where it underflowed to 0."""
    if p is None:
        return None
    return "< 1e-300" if p == 0 else (f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}")
