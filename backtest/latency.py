"""How long an online-store read takes, as a distribution the backtest draws from.

Two sources, both given in milliseconds:
- observed latencies, one per line (a file: blank lines and lines starting with # are
  skipped); a read's latency is one of them drawn uniformly (the empirical distribution, so
  its tail is exactly the observed tail, no fitting);
- "p50,p99": a lognormal with that median and 99th percentile (mu = ln p50,
  sigma = ln(p99 / p50) / z_0.99). A lognormal is the usual shape of a network round trip's
  latency: bounded below, a long right tail.

Whether a drawn read misses is the server's decision (server.records.store_wait_s), made in
backtest/replay.py; this module only says how long reads take.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

__all__ = ["LatencyModel", "parse_quantiles"]

_Z99 = NormalDist().inv_cdf(0.99)


@dataclass(frozen=True)
class LatencyModel:
    """Either `samples_ms` (empirical) or a lognormal (`mu`, `sigma` of ln ms)."""

    description: str
    samples_ms: np.ndarray | None = None
    mu: float = 0.0
    sigma: float = 0.0

    @classmethod
    def lognormal(cls, p50_ms: float, p99_ms: float) -> LatencyModel:
        if not (math.isfinite(p50_ms) and math.isfinite(p99_ms)) or p50_ms <= 0 or p99_ms < p50_ms:
            raise ValueError(f"latency quantiles need 0 < p50 <= p99 (ms), got p50={p50_ms}, p99={p99_ms}")
        return cls(f"lognormal p50 {p50_ms:g} ms, p99 {p99_ms:g} ms", None, math.log(p50_ms), math.log(p99_ms / p50_ms) / _Z99)

    @classmethod
    def observed(cls, samples_ms: np.ndarray, source: str = "observed") -> LatencyModel:
        s = np.asarray(samples_ms, dtype=np.float64).reshape(-1)
        if not len(s):
            raise ValueError(f"{source}: no latencies")
        if not np.isfinite(s).all() or (s < 0).any():
            raise ValueError(f"{source}: latencies must be finite numbers >= 0 (ms)")
        return cls(f"{source}: {len(s)} observed reads, p50 {np.quantile(s, 0.5):.3g} ms, p99 {np.quantile(s, 0.99):.3g} ms", s)

    @classmethod
    def from_file(cls, path: str | Path) -> LatencyModel:
        """One latency in ms per line. Raises ValueError naming the file and line of a bad value."""
        p = Path(path)
        values = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                values.append(float(text))
            except ValueError:
                raise ValueError(f"{p}: line {n}: {text[:40]!r} is not a latency in ms") from None
        return cls.observed(np.asarray(values), str(p))

    def sample(self, rng: np.random.Generator) -> float:
        """One read's latency in ms."""
        if self.samples_ms is not None:
            return float(self.samples_ms[rng.integers(len(self.samples_ms))])
        return float(math.exp(self.mu + self.sigma * rng.standard_normal()))

    def share_over(self, ms: float) -> float:
        """The expected share of reads slower than `ms` (for the report)."""
        if self.samples_ms is not None:
            return float((self.samples_ms > ms).mean())
        if ms <= 0:
            return 1.0
        if self.sigma == 0:
            return float(math.exp(self.mu) > ms)
        return 1.0 - NormalDist(self.mu, self.sigma).cdf(math.log(ms))


def parse_quantiles(text: str) -> tuple[float, float] | None:
    """(p50, p99) from "p50,p99" (two numbers), or None when `text` is not of that form."""
    parts = text.split(",")
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None
