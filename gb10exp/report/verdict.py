"""The verdict on "less than 1% loss" from a confidence interval: pass (upper bound < 1%), fail (lower
bound >= 1%: exactly 1% is not "< 1%") or inconclusive (it straddles 1%; more windows would decide).

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
