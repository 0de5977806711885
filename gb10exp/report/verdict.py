"""The verdict on "less than 1% loss": pass, fail or inconclusive, from a confidence interval.

- pass: the whole interval lies below the threshold (upper bound < 1%).
- fail: the whole interval lies at or above it (lower bound >= 1%): exactly 1% is not "< 1%".
- inconclusive: the interval straddles the threshold; more windows (a larger eval set) would decide.

Bounds are compared after rounding to 12 decimals, so that a loss of exactly 1% that went through
exp/log (1.01 becoming 0.010000000000000009) still counts as exactly 1%.
"""

from __future__ import annotations

from enum import Enum

from gb10exp.report.stats import Interval

THRESHOLD = 0.01  # NVIDIA's "<1% loss", read as a relative perplexity increase
_DECIMALS = 12


class Verdict(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


def verdict(change: Interval, threshold: float = THRESHOLD) -> Verdict:
    """Whether the loss ``change`` (relative perplexity increase) is below ``threshold``."""
    lo, hi, limit = round(change.lo, _DECIMALS), round(change.hi, _DECIMALS), round(threshold, _DECIMALS)
    if hi < limit:
        return Verdict.PASS
    if lo >= limit:
        return Verdict.FAIL
    return Verdict.INCONCLUSIVE
