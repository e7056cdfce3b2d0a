"""Always-valid sequential tests: is the canary worse than the primary, asked again and again.

Why not a t-test: the canary guard looks at its numbers every few seconds and acts on the
first significant answer. A fixed-horizon test watched like that rejects a true null far
more often than its alpha (peeking). The mixture sequential probability ratio test (mSPRT,
Johari, Pekelis & Walsh, "Always valid inference: continuous monitoring of A/B tests",
Operations Research 2022) gives a likelihood ratio Lambda_n that is a (super)martingale
under the null, so by Ville's inequality P(exists n: Lambda_n >= 1/alpha) <= alpha: the
p-value p_n = min(1, 1 / max_{k<=n} Lambda_k) may be read after every batch.

The statistic here works on a difference estimate theta_hat = mean(treatment) -
mean(control) with its variance s^2 = sigma^2 (1/n_t + 1/n_c) (normal approximation, pooled
variance: under the null both arms share one), and a normal mixture over the effect with
scale tau (in units of the pooled standard deviation, so one default fits CTRs and watch
seconds alike). One-sided, "treatment worse": the mixture puts its mass only on effects in
the worse direction (a half-normal), which keeps validity for the whole composite null
"not worse" and doubles the evidence against it compared with the two-sided mixture:

    Lambda = 2 Phi(-m sqrt(a)) sqrt(s^2 / (s^2 + tau^2)) exp(tau^2 theta_hat^2 / (2 s^2 (s^2 + tau^2)))

with a = 1/s^2 + 1/tau^2, m = (theta_hat / s^2) / a, theta_hat signed so that "worse" is
negative. Computed in logs (scipy.special.log_ndtr) so large samples do not overflow.

Two inputs: proportions (click-through: plays over impressions, each impression a
Bernoulli trial) and means (watch seconds per request from n, sum and sum of squares).
The caller keeps the running minimum (`AlwaysValidPValue`) if it wants the p-value; a
rollback acts on the first crossing, where the two agree. Pure numpy/scipy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from scipy.special import log_ndtr

__all__ = ["DEFAULT_TAU", "AlwaysValidPValue", "SequentialResult", "msprt", "two_means", "two_proportions"]

DEFAULT_TAU = 0.1  # mixture scale in pooled standard deviations: effects around a tenth of an SD
Worse = Literal["lower", "higher"]


@dataclass(frozen=True)
class SequentialResult:
    """One look at the data. `p_value` is 1/Lambda capped at 1 (this look only)."""

    estimate: float  # treatment - control, in the metric's units
    stderr: float  # of the estimate (pooled variance)
    log_lr: float  # log Lambda of the one-sided mixture
    p_value: float
    n_treatment: float
    n_control: float

    def rejects(self, alpha: float) -> bool:
        return self.p_value <= alpha

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "stderr": self.stderr, "log_lr": self.log_lr, "p_value": self.p_value,
                "n_treatment": self.n_treatment, "n_control": self.n_control}


def _check_alpha_tau(tau: float) -> None:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


def msprt(estimate: float, variance: float, tau: float, worse: Worse = "lower") -> float:
    """log Lambda of the one-sided normal-mixture SPRT for an estimate with this variance.

    `tau` is the mixture's standard deviation in the estimate's units. `worse="lower"`:
    the alternative is estimate < 0 (treatment lower = worse, e.g. CTR)."""
    _check_alpha_tau(tau)
    if worse not in ("lower", "higher"):
        raise ValueError(f"worse must be 'lower' or 'higher', got {worse!r}")
    if not (math.isfinite(estimate) and math.isfinite(variance)) or variance <= 0:
        return 0.0  # no information yet (an empty arm, or no variance): Lambda = 1
    theta = estimate if worse == "lower" else -estimate  # negative = worse
    s2, t2 = variance, tau * tau
    a = 1.0 / s2 + 1.0 / t2
    m = (theta / s2) / a
    log_two_sided = 0.5 * math.log(s2 / (s2 + t2)) + t2 * theta * theta / (2.0 * s2 * (s2 + t2))
    return float(math.log(2.0) + log_ndtr(-m * math.sqrt(a)) + log_two_sided)


def _result(est: float, var: float, sd: float, tau_sd: float, worse: Worse, n_t: float, n_c: float) -> SequentialResult:
    if sd <= 0 or var <= 0 or not math.isfinite(var):
        return SequentialResult(est, 0.0, 0.0, 1.0, n_t, n_c)
    log_lr = msprt(est, var, tau_sd * sd, worse)
    return SequentialResult(est, math.sqrt(var), log_lr, float(min(1.0, math.exp(-log_lr))), n_t, n_c)


def two_proportions(x_treatment: int, n_treatment: int, x_control: int, n_control: int, *, tau: float = DEFAULT_TAU,
                    worse: Worse = "lower") -> SequentialResult:
    """Is the treatment's proportion x_t/n_t worse than the control's? (e.g. plays per impression)

    Each trial is taken as an independent Bernoulli draw; the pooled proportion gives the
    variance under the null. Counts above their trials are refused."""
    for name, x, n in (("treatment", x_treatment, n_treatment), ("control", x_control, n_control)):
        if n < 0 or x < 0 or x > n:
            raise ValueError(f"{name}: need 0 <= successes <= trials, got {x} of {n}")
    _check_alpha_tau(tau)
    if n_treatment == 0 or n_control == 0:
        return SequentialResult(0.0, 0.0, 0.0, 1.0, float(n_treatment), float(n_control))
    p_t, p_c = x_treatment / n_treatment, x_control / n_control
    pooled = (x_treatment + x_control) / (n_treatment + n_control)
    var1 = pooled * (1.0 - pooled)
    var = var1 * (1.0 / n_treatment + 1.0 / n_control)
    return _result(p_t - p_c, var, math.sqrt(var1), tau, worse, float(n_treatment), float(n_control))


def two_means(n_treatment: float, sum_treatment: float, sumsq_treatment: float, n_control: float, sum_control: float,
              sumsq_control: float, *, tau: float = DEFAULT_TAU, worse: Worse = "lower") -> SequentialResult:
    """Is the treatment's mean worse than the control's? From sufficient statistics (n, sum,
    sum of squares) per arm, so counters can hold them; the pooled within-arm variance is
    used for both arms (normal approximation)."""
    _check_alpha_tau(tau)
    if n_treatment < 0 or n_control < 0:
        raise ValueError(f"sample sizes must be >= 0, got {n_treatment} and {n_control}")
    if n_treatment < 2 or n_control < 2:
        return SequentialResult(0.0, 0.0, 0.0, 1.0, float(n_treatment), float(n_control))
    m_t, m_c = sum_treatment / n_treatment, sum_control / n_control
    ss = (sumsq_treatment - n_treatment * m_t * m_t) + (sumsq_control - n_control * m_c * m_c)
    var1 = max(ss, 0.0) / (n_treatment + n_control - 2)
    var = var1 * (1.0 / n_treatment + 1.0 / n_control)
    return _result(m_t - m_c, var, math.sqrt(var1), tau, worse, float(n_treatment), float(n_control))


class AlwaysValidPValue:
    """The running minimum of 1/Lambda over every look: the always-valid p-value.

    Keep one per (rollout, metric); a new rollout starts a new one."""

    def __init__(self) -> None:
        self.p_value = 1.0
        self.looks = 0

    def update(self, result: SequentialResult) -> float:
        self.looks += 1
        self.p_value = min(self.p_value, result.p_value)
        return self.p_value
