"""How numbers are written for people: the console lines, the trials table image and the report page.

>>> format_value(0.123456), format_value(float("nan")), format_value(None), format_value(3)
('0.1235', '-', '-', '3')
>>> format_duration(75), format_duration(7300), format_duration(None)
('1m15s', '2h01m', '?')
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def format_value(value: Any) -> str:
    """A number to 4 significant digits; ``-`` for a missing or non-finite one; anything else as ``str``."""
    if value is None:
        return "-"
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        value = float(value)
        return f"{value:.4g}" if math.isfinite(value) else "-"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    return str(value)


def format_duration(seconds: float | None) -> str:
    """``42s``, ``1m15s``, ``2h01m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m"
