"""Perplexity, KL divergence and top-1 agreement on a tiny random model, against direct computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gb10exp.evaluate as ev


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 300, (5, 40), generator=torch.Generator().manual_seed(0))


def test_perplexity_matches_transformers_loss(model, windows):
    result = ev.evaluate_accuracy(model, windows, batch_size=2, device=torch.device("cpu"))
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]  # equal-length windows
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert result.eval_tokens == 5 * 39 and result.kl_mean is None
    assert len(result.windows.nll) == 5


def test_against_itself_kl_is_zero_and_agreement_total(model, windows):
    result = ev.evaluate_accuracy(model, windows, 2, torch.device("cpu"), baseline=model)
    assert abs(result.kl_mean) < 1e-6 and result.top1_agreement == 1.0


def test_a_perturbed_model_diverges_and_chunking_does_not_matter(model, windows, monkeypatch):
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    result = ev.evaluate_accuracy(noisy, windows, 2, torch.device("cpu"), baseline=model)
    assert result.kl_mean > 1e-4 and 0.0 < result.top1_agreement < 1.0
    # direct KL on the first window
    with torch.no_grad():
        p = torch.log_softmax(model(windows[:1]).logits[0, :-1], -1)
        q = torch.log_softmax(noisy(windows[:1]).logits[0, :-1], -1)
    assert result.windows.kl[0] == pytest.approx((p.exp() * (p - q)).sum().item(), rel=1e-4)
    monkeypatch.setattr(ev, "POSITION_CHUNK", 7)  # reduction in odd-sized chunks gives the same numbers
    chunked = ev.evaluate_accuracy(noisy, windows, 3, torch.device("cpu"), baseline=model)
    assert chunked.kl_mean == pytest.approx(result.kl_mean, rel=1e-5)
    assert chunked.perplexity == pytest.approx(result.perplexity, rel=1e-6)
    assert chunked.top1_agreement == result.top1_agreement
