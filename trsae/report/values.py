"""Reading a results value and printing a number: shared by the figures, tables and macros.

A results value may be an aggregated leaf ``{"mean", "se", "n", "values"}`` (`trsae.metrics.aggregate_seeds`) or
a plain number (se taken as 0); a missing or ``None`` value is drawn / printed as not available.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

Panel = tuple[str, str, str]
"""``(section, key, label)``: where a metric sits in a results dict, and what to call it."""


def metric_value(result: dict[str, Any], section: str, key: str) -> tuple[float, float] | None:
    """``(mean, se)`` of ``result[section][key]``, or None when missing / undefined / non-finite."""
    v = (result.get(section) or {}).get(key)
    if isinstance(v, dict):
        mean, se = v.get("mean"), v.get("se") or 0.0
    else:
        mean, se = v, 0.0
    if mean is None or isinstance(mean, bool):
        return None
    try:
        mean, se = float(mean), float(se)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(mean):
        return None
    return mean, (se if math.isfinite(se) else 0.0)


def format_number(v: float | int | None, digits: int = 3, latex: bool = False) -> str:
    """``digits`` significant digits in fixed notation; scientific below 1e-3; ints as they are.

    ``None`` / NaN give ``"n/a"``. With ``latex=True`` scientific values read ``1.20\\times10^{-4}``
    (wrap in math mode yourself; ``write_macros`` adds ``\\ensuremath``).
    """
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        raise TypeError("booleans are not numbers here")
    if isinstance(v, numbers.Integral):
        return str(int(v))
    v = float(v)
    if not math.isfinite(v):
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    if a < 1e-3:
        mant, exp = f"{v:.{max(digits - 1, 0)}e}".split("e")
        return f"{mant}\\times10^{{{int(exp)}}}" if latex else f"{mant}e{int(exp)}"
    decimals = max(0, digits - 1 - math.floor(math.log10(a)))
    return f"{v:.{decimals}f}"
