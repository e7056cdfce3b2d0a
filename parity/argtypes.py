"""argparse value types shared by every command line (`parity ...`, `parity serve`, `parity
bench`): one definition of "an integer >= N" and "a finite number", each naming the option in
its error so a bad value reads `parity: error: argument --qps: --qps must be ...`."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from features.durations import parse_duration_ms

__all__ = ["duration", "integer", "nonneg", "number", "positive", "share"]


def integer(name: str, minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be {'> 0' if minimum == 1 else f'>= {minimum}'}, got {v}")
        return v

    return parse


def positive(name: str) -> Callable[[str], int]:
    return integer(name, 1)


def nonneg(name: str) -> Callable[[str], int]:
    return integer(name, 0)


def number(name: str, *, strictly_positive: bool = False, what: str = "a number") -> Callable[[str], float]:
    """A finite float, >= 0 (or > 0 with strictly_positive)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}") from None
        if not math.isfinite(v) or v < 0 or (strictly_positive and v == 0):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number {'>' if strictly_positive else '>='} 0, got {text}")
        return v

    return parse


def share(name: str) -> Callable[[str], float]:
    """A finite float in [0, 1] (a sampling rate or a share)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a share between 0 and 1, got {text!r}") from None
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be a share between 0 and 1, got {text}")
        return v

    return parse


def duration(name: str, *, minimum_ms: int = 1) -> Callable[[str], int]:
    """A duration like 30s, 15m, 1h, 1d (features.durations: the grammar serving modes use
    too), as integer milliseconds >= minimum_ms (0 allows a bare '0')."""
    def parse(text: str) -> int:
        try:
            v = parse_duration_ms(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{name}: {exc}") from None
        if v < minimum_ms:
            raise argparse.ArgumentTypeError(f"{name} must be at least {minimum_ms} ms, got {text!r}")
        return v

    return parse
