"""Relative perplexity change with a confidence interval over evaluation windows and calibration seeds.

"Loss" is the relative perplexity increase ``ppl_q / ppl_ref - 1`` on the same windows (0.01 = 1% higher).
Both runs saw the same tokens, so the bootstrap resamples window indices *jointly* and recomputes both
perplexities from the per-window NLL and token sums: what varies between windows (easy and hard text)
cancels, and the interval measures how much the conclusion depends on which text was evaluated.

A recipe calibrated with several seeds (``seed=0,1,2``) has two sources of noise: the text and the
calibration samples. ``recipe_change`` gives the recipe's expected loss (mean over seeds of the log ratio):

1. Windows: every seed and its reference scored the same windows, so the windows are resampled jointly
   for all of them, on the seed-averaged per-window differences (one seed: exactly the paired bootstrap).
2. Seeds: three seeds are too few to resample (a bootstrap of the mean of three values has ten distinct
   outcomes, and its [min, max] covers the seeds' mean only 75% of the time). Instead each window resample
   gets a draw of the seed mean's error, ``se * T`` (``T``: Student's t with S - 1 degrees of freedom,
   ``se``: the between-seed standard error of the per-seed log ratios, less the part of their scatter the
   windows already account for: in a two-way analysis of variance, seeds x windows, the seed-by-window
   interaction is in both and would count twice). The interval is the percentile interval of the sums.

``tests/test_stats.py`` simulates sweeps with known window and seed variance and checks that the 95% interval
covers the true loss about 95% of the time, where the former rule (the wider of the window interval and
the seeds' min..max) and a plain two-stage bootstrap do not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 4000
CONFIDENCE = 0.95
# "Near 1%" is judged at +/-0.5 percentage points: the half-width an interval needs to tell 0.5% from 1%
# from 1.5%, i.e. to give a pass or a fail to a loss that is half a point away from the threshold.
RESOLVE = 0.005

Windows = dict[str, list[float]]  # results.json's per-window sums: "nll" (nats) and "tokens" (counts)


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
        return (self.hi - self.lo) / 2


@dataclass(frozen=True)
class RecipeChange:
    """A recipe's expected loss against a reference: the interval a verdict uses, and its parts."""

    interval: Interval  # seeds and windows (with one seed: windows alone)
    windows_only: Interval  # the same estimate with the seeds held fixed: only the windows resampled
    seed_half_width: float  # the seed term's 95% half-width, relative (0 with one seed)
    seeds: int
    windows: int

    @property
    def detectable(self) -> float:
        """The smallest loss told apart from zero: the distance from the point to the interval's end nearer
        zero (a smaller loss's interval contains zero: "cannot tell at this size"). Measured at this loss:
        intervals widen with the loss (windows disagree more about a large loss)."""
        i = self.interval
        return i.point - i.lo if i.point >= 0 else i.hi - i.point

    @property
    def cannot_tell(self) -> bool:
        """The interval contains zero: this loss cannot be told apart from no loss."""
        return self.interval.lo <= 0 <= self.interval.hi

    def windows_needed(self, half_width: float = RESOLVE) -> int | None:
        """Windows that would bring the interval to ``±half_width`` at this loss and spread; None when the
        seed term alone is that wide (more seeds can help, more windows cannot). The window part shrinks as
        1/sqrt(n) (a mean over n windows), the seed part does not, and the two add in quadrature:
        ``n * h_windows**2 / (half_width**2 - h_seeds**2)`` (one seed: the usual ``n * (h / half_width)**2``).
        """
        room = half_width**2 - self.seed_half_width**2
        if room <= 0:
            return None
        return max(1, math.ceil(self.windows * self.windows_only.half_width**2 / room))


def point_only(ppl: float, ppl_ref: float) -> Interval:
    """The relative change from the logged perplexities alone (runs without per-window results)."""
    value = ppl / ppl_ref - 1
    return Interval(value, value, value, has_ci=False)


def _differences(pairs: Sequence[tuple[Windows, Windows]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed, per-window NLL differences (seeds x windows, nats) and the windows' token counts."""
    rows, first = [], None
    for windows, ref in pairs:
        nll, ref_nll = np.asarray(windows["nll"], float), np.asarray(ref["nll"], float)
        tokens, ref_tokens = np.asarray(windows["tokens"], float), np.asarray(ref["tokens"], float)
        if nll.shape != ref_nll.shape or not np.array_equal(tokens, ref_tokens):
            raise WindowMismatch(
                f"{nll.size} windows of {tokens.sum():.0f} tokens vs {ref_nll.size} windows of "
                f"{ref_tokens.sum():.0f} tokens"
            )
        if first is not None and not np.array_equal(tokens, first):
            raise WindowMismatch(
                f"seeds of one recipe scored {tokens.size} windows of {tokens.sum():.0f} tokens and "
                f"{first.size} windows of {first.sum():.0f} tokens"
            )
        first = tokens
        rows.append(nll - ref_nll)
    if first is None:
        raise ValueError("recipe_change needs at least one (windows, reference) pair")
    return np.stack(rows), first


def seed_standard_error(diffs: np.ndarray, tokens: np.ndarray) -> float:
    """Standard error of the seed mean of the per-seed log perplexity ratios, from the seeds alone.

    ``diffs``: seeds x windows NLL differences. The per-seed ratios scatter because the seeds differ as a
    whole (what this returns) and because each seed's error differs window by window (the interaction),
    which the window resamples already carry. The interaction's share, from the residuals of the two-way
    layout (each window's row effect scaled by its tokens), is subtracted; a negative result means 0.
    """
    seeds, n = diffs.shape
    if seeds < 2:
        return 0.0
    total = tokens.sum()
    per_seed = diffs.sum(axis=1) / total
    d = per_seed.mean()
    between = per_seed.var(ddof=1)
    interaction = 0.0
    if n > 1:
        resid = diffs - diffs.mean(axis=0) - np.outer(per_seed - d, tokens)
        # E[sum resid^2] = (S-1)(N-1)/N * sum_w var_w; a seed's ratio carries sum_w var_w / total^2 of it.
        interaction = float((resid**2).sum()) / (seeds - 1) * n / (n - 1) / total**2
    return math.sqrt(max(0.0, between - interaction) / seeds)


def _t_quantiles(probabilities: np.ndarray, df: int) -> np.ndarray:
    # scipy comes with mlflow and modelopt; scipy.special loads in a fraction of scipy.stats' 3 s.
    from scipy.special import stdtrit

    return stdtrit(df, probabilities)


def recipe_change(
    pairs: Sequence[tuple[Windows, Windows]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> RecipeChange:
    """The expected loss over the seeds of one recipe: ``pairs`` is one ``(windows, reference windows)``
    per seed, on the same windows (the module docstring says how). Seeded: a report is reproducible to the
    last digit. With one pair, ``interval`` is the paired window bootstrap of ``relative_change``."""
    diffs, tokens = _differences(pairs)
    seeds, n = diffs.shape
    mean_diff = diffs.mean(axis=0)  # seed-averaged NLL difference per window
    # exp(Δ mean NLL) - 1 == ppl/ppl_ref - 1; expm1 keeps precision for tiny differences.
    log_ratio = mean_diff.sum() / tokens.sum()
    point = math.expm1(log_ratio)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    boot = mean_diff[idx].sum(axis=1) / tokens[idx].sum(axis=1)
    tail = (1 - confidence) / 2
    windows_only = _percentile_interval(point, boot, tail)
    se, seed_half = seed_standard_error(diffs, tokens), 0.0
    if se > 0:
        # Stratified t draws (evenly spaced quantiles in a seeded random order): the seed term's tails are
        # exact, where 4,000 random t draws with 2 degrees of freedom move its 97.5% point by about 5%.
        strata = (rng.permutation(resamples) + 0.5) / resamples
        boot = boot + se * _t_quantiles(strata, seeds - 1)
        # On the loss scale: d(expm1(x))/dx = exp(x).
        seed_half = float(_t_quantiles(np.array([1 - tail]), seeds - 1)[0] * se * math.exp(log_ratio))
    interval = _percentile_interval(point, boot, tail) if se > 0 else windows_only
    return RecipeChange(interval, windows_only, seed_half, seeds, n)


def _percentile_interval(point: float, log_ratios: np.ndarray, tail: float) -> Interval:
    lo, hi = np.percentile(np.expm1(log_ratios), [tail * 100, 100 - tail * 100])
    return Interval(point, float(lo), float(hi))


def relative_change(
    windows: Windows,
    ref_windows: Windows,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """``ppl / ppl_ref - 1`` with a paired percentile-bootstrap interval over windows (one run)."""
    return recipe_change([(windows, ref_windows)], resamples, confidence, seed).interval


def ppl_interval(
    windows: Windows, resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> Interval:
    """One run's perplexity with an (unpaired) bootstrap interval: how much it moves with the text."""
    nll, tokens = np.asarray(windows["nll"], float), np.asarray(windows["tokens"], float)
    idx = np.random.default_rng(seed).integers(0, nll.size, size=(resamples, nll.size))
    boot = np.exp(nll[idx].sum(axis=1) / tokens[idx].sum(axis=1))
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return Interval(math.exp(nll.sum() / tokens.sum()), float(lo), float(hi))
