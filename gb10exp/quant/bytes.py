"""The one count of deployed weight bytes (metric ``weight_gib``) and of bytes read per decoded token.

A format's deployed weights: every linear layer it quantizes at the format's bits per weight
(``qformat.weight_bits``, scales included), everything else (embeddings, norms, biases, the output head)
at 16 bits, and a tensor shared by two modules (tied input/output embeddings) once. Which linear layers
are quantized: those whose modelopt weight quantizer is enabled in a fake-quantized model; in a model
that carries no quantizers while the format quantizes (an engine quantizes it, e.g. GGUF), every linear
layer but the output head. The input and output embeddings stay at 16 bits whatever the quantizers say.

A decode step reads every deployed weight once, except the input embedding table, of which it reads
one row per token (ignored: a few KB) unless the table is also the output head
(``gb10exp.bench.roofline.decode_step_bytes``); the engines' own counts (GGUF tensors, exported safetensors) apply the same rule to the files
they really run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gb10exp.bench.roofline import decode_step_bytes

if TYPE_CHECKING:
    from gb10exp.config import QFormatConfig

DENSE_BITS = 16.0  # what unquantized tensors are deployed at (bf16 / fp16)


def _quantized_weights(model: torch.nn.Module, qformat: QFormatConfig | None) -> set[int]:
    """data_ptr of the linear weights stored at the format's bits."""
    if qformat is None or qformat.weight_bits >= DENSE_BITS:
        return set()
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    kept = {m.weight.data_ptr() for m in (embed, head) if m is not None}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if any(hasattr(m, "weight_quantizer") for m in model.modules()):  # modelopt fake quantization
        chosen = [
            m
            for m in linears
            if getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.is_enabled
        ]
    else:  # the engine quantizes: its recipe covers the linear layers
        chosen = [m for m in linears if m is not head]
    return {m.weight.data_ptr() for m in chosen} - kept


def tensor_bytes(
    model: torch.nn.Module, qformat: QFormatConfig | None = None, dense_bits: float | None = DENSE_BITS
) -> dict[int, float]:
    """Bytes of each distinct parameter (keyed by data_ptr, so tied tensors appear once): quantized linear
    weights at ``qformat.weight_bits``, the rest at ``dense_bits`` (None: as stored in memory)."""
    quantized = _quantized_weights(model, qformat)
    out: dict[int, float] = {}
    for param in model.parameters():
        ptr = param.data_ptr()
        if ptr in out:
            continue
        if ptr in quantized:
            bits = qformat.weight_bits
        else:
            bits = param.element_size() * 8 if dense_bits is None else dense_bits
        out[ptr] = param.numel() * bits / 8
    # SVDQuant keeps a 16-bit low-rank branch beside each 4-bit weight (buffers on its weight quantizer):
    # the engine reads it every step, so it is deployed weight bytes too.
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        for name in ("_svdquant_lora_a", "_svdquant_lora_b"):
            branch = getattr(quantizer, name, None)
            if isinstance(branch, torch.Tensor) and branch.data_ptr() not in out:
                out[branch.data_ptr()] = branch.numel() * (branch.element_size() * 8 if dense_bits is None else dense_bits) / 8
    return out


def deployed_weight_bytes(model: torch.nn.Module, qformat_cfg: QFormatConfig | None) -> float:
    """THE deployed weight bytes of ``model`` in ``qformat_cfg`` (metric ``weight_gib`` x 2**30)."""
    return float(sum(tensor_bytes(model, qformat_cfg).values()))


def decode_bytes(
    model: torch.nn.Module, qformat: QFormatConfig | None = None, dense_bits: float | None = DENSE_BITS
) -> float:
    """Bytes one decode step reads, the weights counted as ``tensor_bytes`` does (roofline's rule)."""
    return decode_step_bytes(model, tensor_bytes(model, qformat, dense_bits))


def deployed_decode_bytes(model: torch.nn.Module, qformat_cfg: QFormatConfig | None) -> float:
    """Bytes per decoded token of the deployed format: the roofline of an engine that runs it."""
    return decode_bytes(model, qformat_cfg, DENSE_BITS)


def in_memory_decode_bytes(model: torch.nn.Module) -> float:
    """Bytes per decoded token of the model as PyTorch holds it (fake quantization keeps full weights)."""
    return decode_bytes(model, None, dense_bits=None)
