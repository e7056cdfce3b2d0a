"""Durations written for people ("30s", "15m", "1h", "1d") and back, in integer milliseconds.

One grammar for every place a person types a span of time: a serving mode's cadence
(`materialized:15m`), a backtest's staleness list (`0,1m,15m,1h`). It lives in features/ so
the feature layer can parse its own declarations without importing the command line
(parity.argtypes wraps it for argparse). A unit is required, except for a bare 0: a cadence
of "15" is far more likely a forgotten "m" than fifteen milliseconds.
"""
from __future__ import annotations

import re

from features.events import MS_PER_DAY, MS_PER_HOUR, MS_PER_MINUTE

__all__ = ["UNITS_MS", "format_duration_ms", "parse_duration_ms"]

UNITS_MS = {"ms": 1, "s": 1000, "m": MS_PER_MINUTE, "min": MS_PER_MINUTE, "h": MS_PER_HOUR, "d": MS_PER_DAY}
_FORMAT_UNITS = (("d", MS_PER_DAY), ("h", MS_PER_HOUR), ("m", MS_PER_MINUTE), ("s", 1000))
_DURATION = re.compile(r"\s*(\d+)(?:\.(\d+))?\s*(ms|s|min|m|h|d)?\s*")
_MAX_MS = 1 << 62  # event times are int64 ms; a span beyond this cannot be added to one


def parse_duration_ms(text: str) -> int:
    """'500ms', '30s', '15m', '1.5h', '7d' (or '0') as integer milliseconds >= 0.

    Raises ValueError saying what was wrong; callers add which option it was.
    """
    if not isinstance(text, str):
        raise TypeError(f"a duration is text like '15m', got {type(text).__name__}")
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ValueError(f"bad duration {text!r}: use a whole or decimal number with a unit (ms, s, m, h, d), e.g. 30s, 15m, 1h")
    whole, frac, unit = m.group(1), m.group(2) or "", m.group(3)
    if unit is None:
        if int(whole) == 0 and not frac.strip("0"):
            return 0
        raise ValueError(f"bad duration {text!r}: a unit is required (ms, s, m, h, d), e.g. {whole}m")
    scale = UNITS_MS[unit]
    numerator = int(whole + frac) * scale  # exact: no float rounding
    denominator = 10 ** len(frac)
    if numerator % denominator:
        raise ValueError(f"bad duration {text!r}: not a whole number of milliseconds")
    ms = numerator // denominator
    if ms >= _MAX_MS:
        raise ValueError(f"bad duration {text!r}: longer than any event time span")
    return ms


def format_duration_ms(ms: int) -> str:
    """The shortest exact spelling in the largest unit: 900000 -> '15m', 90000 -> '90s'.

    parse_duration_ms(format_duration_ms(x)) == x for every int x >= 0.
    """
    if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
        raise ValueError(f"a duration is an int of milliseconds >= 0, got {ms!r}")
    if ms == 0:
        return "0"
    for unit, scale in _FORMAT_UNITS:
        if ms % scale == 0:
            return f"{ms // scale}{unit}"
    return f"{ms}ms"
