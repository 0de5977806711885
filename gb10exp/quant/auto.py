"""qformat=auto: a per-layer mix of formats under an average bit budget, searched by modelopt's
``mtq.auto_quantize``, and the record of what it chose.

The budget (``qformat.auto.effective_bits``) is the average bits per weight, scales included, over the
linear layers every fixed format quantizes: lm_head is neither searched nor counted (modelopt would count
it at 16 bits, so the same budget would mean less on a model with a large vocabulary). The search
calibrates every candidate on the job's calibration samples, then scores each layer group and format
(modelopt groups q/k/v and gate/up, which engines fuse) on ``score_samples`` of them, one sample per
forward.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch

from gb10exp.config import QFormatConfig
from gb10exp.quant.formats import load_qformat, quantizer_bits

log = logging.getLogger(__name__)

EXCLUDED = ["*lm_head*"]  # what no fixed format quantizes (modelopt's default_disabled_quantizers)


def search(model: torch.nn.Module, qformat: QFormatConfig, loop: Any) -> torch.nn.Module:
    """Run ``mtq.auto_quantize`` on ``model`` (in place) and return the quantized model."""
    import modelopt.torch.quantization as mtq

    auto = qformat.auto
    # By name: modelopt labels its choices (and checks them) by the config names it knows.
    candidates = [load_qformat(f).modelopt_cfg for f in auto.formats]
    batches = list(loop.batches(1))  # one sample per step: a score step is one forward per group and format

    def forward_step(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch).logits

    def loss_func(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:  # method=gradient only
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())

    log.info(
        "auto_quantize over %s to %.2f effective bits (%s)", auto.formats, auto.effective_bits, auto.method
    )
    constraints = {"effective_bits": auto.effective_bits, "cost": {"excluded_module_name_patterns": EXCLUDED}}
    model, _ = mtq.auto_quantize(
        model,
        constraints=constraints,
        quantization_formats=candidates,
        data_loader=batches,
        forward_step=forward_step,
        loss_func=loss_func if auto.method == "gradient" else None,
        disabled_layers=EXCLUDED,
        num_calib_steps=len(batches),
        num_score_steps=min(auto.score_samples, len(batches)),
        method=auto.method,
    )
    return model


def layer_choice(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Every linear layer the search could quantize: its format (modelopt's export name, "none" for
    16-bit), its bits per weight and its weight count. Read from the model itself, so a cached model
    restored from disk gives the same record as a fresh search."""
    from modelopt.torch.export.quant_utils import get_quantization_format

    choice = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is None or not isinstance(module, torch.nn.Linear) or "lm_head" in name:
            continue
        choice[name] = {
            "format": get_quantization_format(module) or "none",
            "bits": quantizer_bits(quantizer),
            "weights": module.weight.numel(),
        }
    return choice


def record(model: torch.nn.Module, recorder: Any) -> dict[str, float]:
    """Log the per-layer choice (artifact layer_formats.json: layer -> format) and return the metric
    ``effective_bits`` (achieved, over the searched layers). Its bytes follow the one byte rule, which reads
    every layer's own bits from its quantizer (``gb10exp.quant.bytes.from_module``)."""
    choice = layer_choice(model)
    searched = sum(c["weights"] for c in choice.values())
    counts = dict(Counter(c["format"] for c in choice.values()))
    recorder.log_dict(
        {
            "layers": {n: c["format"] for n, c in choice.items()},
            "bits": {n: c["bits"] for n, c in choice.items()},
            "layer_counts": counts,
        },
        "layer_formats.json",
    )
    return {"effective_bits": sum(c["bits"] * c["weights"] for c in choice.values()) / searched}
