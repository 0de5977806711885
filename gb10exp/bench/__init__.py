"""Measurement rules, in one place for every backend.

A backend supplies one function, ``generate_once() -> Timing``, that sends one request of exactly
``input_len`` prompt tokens and receives exactly ``output_len`` new tokens, stamping the time the first
token arrived and the time of each later one. ``measure`` runs it ``warmup`` times unrecorded, then
``repeats`` times, and reduces the timings to medians and p90s. GPU backends synchronize the device
before they stamp a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timing:
    """One request: stamps in seconds from ``time.perf_counter()``."""

    start: float
    token_times: list[float] = field(default_factory=list)  # arrival of each generated token
    batch_size: int = 1

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.start

    @property
    def inter_token(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(timings: list[Timing], input_len: int, output_len: int) -> dict[str, float]:
    """Medians and p90s over repetitions. Decode rate comes from the inter-token gaps themselves, never
    from subtracting TTFT from end-to-end time (which can go negative under noise)."""
    for t in timings:
        if len(t.token_times) != output_len:
            raise RuntimeError(f"a backend returned {len(t.token_times)} tokens, expected output_len={output_len}")
    ttft = [t.ttft for t in timings]
    tpot = [statistics.fmean(t.inter_token) for t in timings if t.inter_token]
    gaps = [g for t in timings for g in t.inter_token]
    batch = timings[0].batch_size
    out = {
        "ttft_s": statistics.median(ttft),
        "ttft_p90_s": percentile(ttft, 0.9),
        "e2e_s": statistics.median([t.e2e for t in timings]),
        "prefill_tokens_per_s": batch * input_len / statistics.median(ttft),
    }
    if tpot:
        out |= {
            "tpot_s": statistics.median(tpot),
            "itl_p90_s": percentile(gaps, 0.9),
            "decode_tokens_per_s": batch / statistics.median(tpot),
        }
    return out


def measure(generate_once: Callable[[], Timing], warmup: int, repeats: int, input_len: int, output_len: int):
    for _ in range(warmup):
        generate_once()
    return summarize([generate_once() for _ in range(repeats)], input_len, output_len)


def now() -> float:
    return time.perf_counter()
