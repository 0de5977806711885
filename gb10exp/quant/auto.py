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
from typing import Any

import torch

from gb10exp.config import QFormatConfig

log = logging.getLogger(__name__)

EXCLUDED = ["*lm_head*"]  # what no fixed format quantizes (modelopt's default_disabled_quantizers)


def search(model: torch.nn.Module, qformat: QFormatConfig, loop: Any) -> torch.nn.Module:
    """Run ``mtq.auto_quantize`` on ``model`` (in place) and return the quantized model."""
    import modelopt.torch.quantization as mtq

    from gb10exp.quant import load_qformat

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
    model, _ = mtq.auto_quantize(
        model,
        constraints={
            "effective_bits": auto.effective_bits,
            "cost": {"excluded_module_name_patterns": EXCLUDED},
        },
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


def weight_bits(quantizer: Any) -> float:
    """Bits per weight of a weight quantizer, scales included: element bits plus 8 (FP8 or E8M0) or 16
    (integer formats' scales) bits per block. Per-tensor and per-channel scales count as nothing."""
    if not getattr(quantizer, "is_enabled", False):
        return 16.0
    if hasattr(quantizer, "__getitem__") and not hasattr(quantizer, "num_bits"):  # SequentialQuantizer
        quantizer = quantizer[0]
    num_bits = quantizer.num_bits
    bits = float(sum(num_bits) + 1 if isinstance(num_bits, (tuple, list)) else num_bits)
    block = (quantizer.block_sizes or {}).get(-1)
    if block:
        scale_bits = (quantizer.block_sizes or {}).get("scale_bits")
        bits += (8.0 if scale_bits is not None else 16.0) / block
    return bits


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
            "bits": weight_bits(quantizer),
            "weights": module.weight.numel(),
        }
    return choice


def record(model: torch.nn.Module, recorder: Any) -> dict[str, float]:
    """Log the per-layer choice (artifact layer_formats.json: layer -> format) and return the metrics
    ``effective_bits`` (achieved, over the searched layers) and ``weight_gib`` (every weight at its own
    layer's bits; embeddings, norms and lm_head at 16)."""
    choice = layer_choice(model)
    searched = sum(c["weights"] for c in choice.values())
    bits = sum(c["bits"] * c["weights"] for c in choice.values())
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() not in seen:  # tied embeddings count once
            seen.add(param.data_ptr())
            total += param.numel()
    counts: dict[str, int] = {}
    for c in choice.values():
        counts[c["format"]] = counts.get(c["format"], 0) + 1
    recorder.log_dict(
        {
            "layers": {n: c["format"] for n, c in choice.items()},
            "bits": {n: c["bits"] for n, c in choice.items()},
            "layer_counts": counts,
        },
        "layer_formats.json",
    )
    return {"effective_bits": bits / searched, "weight_gib": (bits / 8 + (total - searched) * 2) / 2**30}
