"""Accuracy: perplexity on fixed windows, and KL divergence / top-1 agreement against the baseline.

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

POSITION_CHUNK = 256  # positions reduced at a time: caps float32 log-softmax buffers at chunk x vocab


@dataclass
class WindowStats:
    """Sums over the predicted tokens of each window (for bootstrap intervals in reports)."""

    nll: list[float] = field(default_factory=list)  # summed negative log-likelihood, nats
    kl: list[float] = field(default_factory=list)  # summed KL(baseline || model), nats
    agree: list[int] = field(default_factory=list)  # tokens whose top-1 matches the baseline's
    tokens: list[int] = field(default_factory=list)  # predicted tokens


@dataclass
class AccuracyResult:
    perplexity: float  # exp(mean NLL) over all predicted tokens
    nll_mean: float  # nats per token
    eval_tokens: int  # predicted tokens (seq_len - 1 per window)
    kl_mean: float | None  # nats per token; None without a baseline
    top1_agreement: float | None  # fraction of tokens
    windows: WindowStats

    def metrics(self) -> dict[str, float]:
        out = {"perplexity": self.perplexity, "nll_mean": self.nll_mean, "eval_tokens": float(self.eval_tokens)}
        if self.kl_mean is not None:
            out |= {"kl_mean": self.kl_mean, "top1_agreement": self.top1_agreement}
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, base_logits: torch.Tensor | None):
    """(nll sum, kl sum, agreement count) for one window's logits (T, V) and targets (T,)."""
    nll = kl = 0.0
    agree = 0
    for start in range(0, targets.numel(), POSITION_CHUNK):
        sl = slice(start, start + POSITION_CHUNK)
        logp = F.log_softmax(logits[sl].float(), dim=-1)
        nll += -logp.gather(-1, targets[sl, None]).sum().item()
        if base_logits is not None:
            base_logp = F.log_softmax(base_logits[sl].float(), dim=-1)
            # KL(P_base || P_model) = sum_v p_base (log p_base - log p_model)
            kl += F.kl_div(logp, base_logp, log_target=True, reduction="sum").item()
            agree += (logp.argmax(-1) == base_logp.argmax(-1)).sum().item()
    return nll, kl, agree


@torch.no_grad()
def evaluate_accuracy(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    baseline: torch.nn.Module | None = None,
) -> AccuracyResult:
    """Perplexity of ``model`` on ``windows`` (N, T); with ``baseline``, also KL and top-1 agreement."""
    stats = WindowStats()
    for batch in tqdm(windows.split(batch_size), desc="evaluate", unit="batch", leave=False):
        batch = batch.to(device)
        logits = model(batch).logits[:, :-1]
        base_logits = baseline(batch).logits[:, :-1] if baseline is not None else None
        targets = batch[:, 1:]
        for i in range(batch.shape[0]):
            nll, kl, agree = _chunk_stats(logits[i], targets[i], None if base_logits is None else base_logits[i])
            stats.nll.append(nll)
            stats.kl.append(kl)
            stats.agree.append(agree)
            stats.tokens.append(targets.shape[1])
    tokens = sum(stats.tokens)
    nll_mean = sum(stats.nll) / tokens
    has_base = baseline is not None
    return AccuracyResult(
        perplexity=math.exp(nll_mean),
        nll_mean=nll_mean,
        eval_tokens=tokens,
        kl_mean=sum(stats.kl) / tokens if has_base else None,
        top1_agreement=sum(stats.agree) / tokens if has_base else None,
        windows=stats,
    )
