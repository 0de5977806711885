"""Accuracy: perplexity on fixed windows, and KL divergence / top-1 agreement against the baseline.

Only the scored positions of each window count (``gb10exp.data.EvalWindows``: which ones depends on
``eval.protocol``). The baseline's own negative log-likelihood on those positions comes free with its
logits and is kept as the reference perplexity (``ref_nll``): a quantized run carries its reference.

Perplexity alone moves little for small losses; the KL divergence of the quantized model's next-token
distribution from the unquantized model's, on the same tokens, and how often both pick the same top-1
token, are far more sensitive. Both models run window by window, and logits are reduced in chunks of
positions, so memory stays bounded by one batch of logits whatever the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gb10exp.data import EvalWindows

POSITION_CHUNK = 256  # positions reduced at a time: caps float32 log-softmax buffers at chunk x vocab


@dataclass
class WindowStats:
    """Sums over the predicted tokens of each window (for bootstrap intervals in reports)."""

    nll: list[float] = field(default_factory=list)  # summed negative log-likelihood, nats
    kl: list[float] = field(default_factory=list)  # summed KL(baseline || model), nats
    agree: list[int] = field(default_factory=list)  # tokens whose top-1 matches the baseline's
    tokens: list[int] = field(default_factory=list)  # scored (predicted) tokens
    ref_nll: list[float] = field(default_factory=list)  # the baseline's summed NLL on the same tokens, if run


@dataclass
class AccuracyResult:
    perplexity: float  # exp(mean NLL) over all scored tokens
    nll_mean: float  # nats per token
    eval_tokens: int  # scored tokens (the protocol decides how many per window)
    kl_mean: float | None  # nats per token; None without a baseline
    top1_agreement: float | None  # fraction of tokens
    windows: WindowStats
    reference_perplexity: float | None = None  # the baseline's, on the same tokens; None without one
    reference_nll_mean: float | None = None

    def metrics(self) -> dict[str, float]:
        out = {"perplexity": self.perplexity, "nll_mean": self.nll_mean, "eval_tokens": float(self.eval_tokens)}
        if self.kl_mean is not None:
            out |= {"kl_mean": self.kl_mean, "top1_agreement": self.top1_agreement}
        if self.reference_perplexity is not None:
            out |= {"reference_perplexity": self.reference_perplexity, "reference_nll_mean": self.reference_nll_mean}
        return out

    def as_dict(self) -> dict:
        out = asdict(self)
        if not self.windows.ref_nll:  # no reference evaluated: results.json keeps its former shape
            del out["windows"]["ref_nll"]
        return out


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, base_logits: torch.Tensor | None):
    """(nll sum, kl sum, agreement count, baseline nll sum) for one window's logits (T, V) and targets (T,)."""
    nll = kl = ref_nll = 0.0
    agree = 0
    for start in range(0, targets.numel(), POSITION_CHUNK):
        sl = slice(start, start + POSITION_CHUNK)
        logp = F.log_softmax(logits[sl].float(), dim=-1)
        nll += -logp.gather(-1, targets[sl, None]).sum().item()
        if base_logits is not None:
            base_logp = F.log_softmax(base_logits[sl].float(), dim=-1)
            ref_nll += -base_logp.gather(-1, targets[sl, None]).sum().item()
            # KL(P_base || P_model) = sum_v p_base (log p_base - log p_model)
            kl += F.kl_div(logp, base_logp, log_target=True, reduction="sum").item()
            agree += (logp.argmax(-1) == base_logp.argmax(-1)).sum().item()
    return nll, kl, agree, ref_nll


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, windows: EvalWindows | torch.Tensor, batch_size: int,
                      device: torch.device, baseline: torch.nn.Module | None = None) -> AccuracyResult:
    """Perplexity of ``model`` on the scored tokens of ``windows`` (a plain (N, T) tensor: every target
    scored); with ``baseline``, also KL, top-1 agreement and the baseline's own NLL (``ref_nll``)."""
    if isinstance(windows, torch.Tensor):
        windows = EvalWindows(windows, torch.ones(windows.shape[0], dtype=torch.long))
    stats = WindowStats()
    has_base = baseline is not None
    starts = windows.score_from.tolist()
    for b, batch in enumerate(tqdm(windows.tokens.split(batch_size), desc="evaluate", unit="batch", leave=False)):
        batch = batch.to(device)
        logits = model(batch).logits
        base_logits = baseline(batch).logits if has_base else None
        for i in range(batch.shape[0]):
            s = starts[b * batch_size + i]  # logits at s - 1 .. T - 2 predict targets s .. T - 1
            nll, kl, agree, ref_nll = _chunk_stats(logits[i, s - 1 : -1], batch[i, s:],
                                                   base_logits[i, s - 1 : -1] if has_base else None)
            stats.nll.append(nll)
            stats.kl.append(kl)
            stats.agree.append(agree)
            stats.tokens.append(batch.shape[1] - s)
            if has_base:
                stats.ref_nll.append(ref_nll)
    tokens = sum(stats.tokens)
    nll_mean = sum(stats.nll) / tokens
    ref_mean = sum(stats.ref_nll) / tokens if has_base else None
    return AccuracyResult(perplexity=math.exp(nll_mean), nll_mean=nll_mean, eval_tokens=tokens,
                          kl_mean=sum(stats.kl) / tokens if has_base else None,
                          top1_agreement=sum(stats.agree) / tokens if has_base else None, windows=stats,
                          reference_perplexity=math.exp(ref_mean) if has_base else None,
                          reference_nll_mean=ref_mean)
