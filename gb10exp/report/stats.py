"""Relative perplexity change with a paired bootstrap confidence interval over evaluation windows.

"Loss" throughout is the relative perplexity increase ``ppl_q / ppl_ref - 1`` on the same windows (0.01
= 1% higher perplexity). Both runs saw the same tokens, so the bootstrap resamples window indices
*jointly*: each resample draws N window indices with replacement and recomputes both perplexities
from the per-window sums of negative log-likelihood and token counts. What varies between windows
(easy and hard text) then cancels, and the interval measures how much the conclusion depends on which
text was evaluated. It says nothing about other text, other tasks or other seeds of calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 4000
CONFIDENCE = 0.95


class WindowMismatch(ValueError):
    """Two runs were not evaluated on the same windows: a paired comparison would be meaningless."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval; ``lo == hi == point`` when there is none."""

    point: float
    lo: float
    hi: float
    has_ci: bool = True

    @property
    def half_width(self) -> float:
        """Half the interval's width: the noise floor of this comparison."""
        return (self.hi - self.lo) / 2


def point_only(ppl: float, ppl_ref: float) -> Interval:
    """The relative change from the logged perplexities alone (runs without per-window results)."""
    value = ppl / ppl_ref - 1
    return Interval(value, value, value, has_ci=False)


def relative_change(
    windows: dict[str, list[float]],
    ref_windows: dict[str, list[float]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """``ppl / ppl_ref - 1`` with a paired percentile-bootstrap interval over windows.

    ``windows`` are ``results.json``'s per-window sums (``nll``: nats, ``tokens``: counts). The
    generator is seeded, so a report is reproducible to the last digit.
    """
    nll, ref_nll = np.asarray(windows["nll"], float), np.asarray(ref_windows["nll"], float)
    tokens, ref_tokens = np.asarray(windows["tokens"], float), np.asarray(ref_windows["tokens"], float)
    if nll.shape != ref_nll.shape or not np.array_equal(tokens, ref_tokens):
        raise WindowMismatch(
            f"{nll.size} windows of {tokens.sum():.0f} tokens vs {ref_nll.size} windows of "
            f"{ref_tokens.sum():.0f} tokens"
        )
    diff = nll - ref_nll
    # exp(Δ mean NLL) - 1 == ppl/ppl_ref - 1; expm1 keeps precision for tiny differences.
    point = math.expm1(diff.sum() / tokens.sum())
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(resamples, diff.size))
    boot = np.expm1(diff[idx].sum(axis=1) / tokens[idx].sum(axis=1))
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return Interval(point, float(lo), float(hi))


def ppl_interval(
    windows: dict[str, list[float]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """One run's perplexity with an (unpaired) bootstrap interval: how much it moves with the text."""
    nll, tokens = np.asarray(windows["nll"], float), np.asarray(windows["tokens"], float)
    idx = np.random.default_rng(seed).integers(0, nll.size, size=(resamples, nll.size))
    boot = np.exp(nll[idx].sum(axis=1) / tokens[idx].sum(axis=1))
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return Interval(math.exp(nll.sum() / tokens.sum()), float(lo), float(hi))
