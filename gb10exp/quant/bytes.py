"""The one byte rule: the deployed weight bytes (metric ``weight_gib``) and the bytes a decode step reads.

``decode_step_bytes`` is the rule, written once: a decode step reads every stored tensor once, except an
input embedding that is not also the output head (a token reads one row of it, a few KB: ignored), plus the
KV cache of every token in the context, for each sequence of the batch. Three readers make its ``Tensors``:
- ``from_module``: a PyTorch model in a format: every linear layer the format quantizes at its bits per
  weight (scales included; ``formats.Format.weight_bits``), everything else (embeddings, norms, biases, the
  output head) at 16 bits, a tensor shared by two modules (tied embeddings) once. Quantized layers: those
  whose modelopt weight quantizer is enabled in a fake-quantized model; in a model without quantizers whose
  format an engine quantizes (GGUF), every one but the head. ``dense_bits=None`` counts the model as
  PyTorch holds it instead (fake quantization keeps full weights);
- ``from_safetensors``: a checkpoint folder (modelopt's export), from the file headers alone;
- ``from_gguf``: a GGUF file, from its header alone.
The KV cache: K and V of every layer, ``num_key_value_heads x head_dim`` values each per token, at 16 bits
unless quantized (fp8: 8 bits; nvfp4: 4.5 bits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gb10exp.models.gguf_file import read_gguf
from gb10exp.quant.formats import DENSE_BITS, quantizer_bits

if TYPE_CHECKING:
    import torch

    from gb10exp.quant.formats import Format

KV_BITS = {"none": DENSE_BITS, "fp8": 8.0, "nvfp4": 4.5}


@dataclass(frozen=True)
class Tensors:
    """What a decode step can read: bytes per stored tensor (a tied tensor once), which tensor is the input
    embedding and which the output head (the same name when tied), and the KV cache's bytes per token."""

    sizes: dict[str, float]
    embed: str | None
    head: str | None
    kv_bytes_per_token: float
    source: str  # what was counted, for the run's tags

    @property
    def weight_bytes(self) -> float:
        """Every stored tensor: what the engine holds (metric ``weight_gib`` x 2**30)."""
        return float(sum(self.sizes.values()))


def decode_step_bytes(tensors: Tensors, context: float = 0.0, batch: int = 1) -> float:
    """THE rule: bytes one decode step reads with ``context`` tokens already in each of ``batch`` sequences."""
    total = tensors.weight_bytes
    if tensors.embed is not None and tensors.embed != tensors.head:
        total -= tensors.sizes.get(tensors.embed, 0.0)
    return total + batch * context * tensors.kv_bytes_per_token


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, bits: float = DENSE_BITS) -> float:
    """K and V of every layer for one token."""
    return 2.0 * layers * kv_heads * head_dim * bits / 8


def _kv_from_config(config: Any, bits: float) -> float:
    """The KV cache per token of a transformers config (its text config, for multimodal wrappers)."""
    text = getattr(config, "get_text_config", lambda: config)()
    get = (lambda k: text.get(k)) if isinstance(text, dict) else (lambda k: getattr(text, k, None))
    heads = get("num_attention_heads")
    if not heads or not get("num_hidden_layers"):
        return 0.0
    head_dim = get("head_dim") or get("hidden_size") // heads
    return kv_bytes_per_token(get("num_hidden_layers"), get("num_key_value_heads") or heads, head_dim, bits)


# -- readers ------------------------------------------------------------------------------------------------
def _linear_bits(model: torch.nn.Module, fmt: Format | None) -> dict[int, float]:
    """id -> bits of every linear weight stored below 16 bits: in a fake-quantized model each layer's
    own quantizer says (so qformat=auto's per-layer mix counts exactly); in a model without quantizers while
    the format quantizes (an engine quantizes it), every linear layer but the output head at the format's bits.
    The input and output embeddings stay at 16 bits whatever the quantizers say."""
    import torch

    if fmt is None or not fmt.quantized:
        return {}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    kept = {id(m.weight) for m in (embed, head) if m is not None}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if any(hasattr(m, "weight_quantizer") for m in model.modules()):  # modelopt fake quantization
        bits = {id(m.weight): quantizer_bits(m.weight_quantizer) for m in linears
                if getattr(m, "weight_quantizer", None) is not None}
    else:
        bits = {id(m.weight): fmt.weight_bits for m in linears if m is not head}
    return {ptr: b for ptr, b in bits.items() if ptr not in kept and b < DENSE_BITS}


def from_module(model: torch.nn.Module, fmt: Format | None = None, dense_bits: float | None = DENSE_BITS,
                kv_cache_qformat: str = "none") -> Tensors:
    """A PyTorch model deployed in ``fmt`` (``dense_bits=None``: as PyTorch holds it in memory)."""
    # Parameters by identity, not data_ptr: a tied parameter is one object, and meta tensors (a model too
    # large to build, layer-wise calibration) all have data_ptr 0.
    quantized = _linear_bits(model, fmt) if dense_bits is not None else {}
    names = {id(p): n for n, p in model.named_parameters()}  # remove_duplicate: a tied tensor once
    sizes: dict[str, float] = {}
    for name, param in model.named_parameters():
        bits = quantized.get(id(param), param.element_size() * 8 if dense_bits is None else dense_bits)
        sizes[name] = param.numel() * bits / 8
    # SVDQuant keeps a 16-bit low-rank branch beside each 4-bit weight (buffers on its weight quantizer):
    # the engine reads it every step, so it is deployed weight bytes too.
    for module_name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        for attr in ("_svdquant_lora_a", "_svdquant_lora_b"):
            branch = getattr(quantizer, attr, None)
            if branch is not None and hasattr(branch, "numel"):
                bits = branch.element_size() * 8 if dense_bits is None else dense_bits
                sizes[f"{module_name}.weight_quantizer.{attr}"] = branch.numel() * bits / 8
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    embed_name = names.get(id(embed.weight)) if embed is not None else None
    head_name = names.get(id(head.weight)) if head is not None else None  # tied: the embedding's name
    kv_bits = next(model.parameters()).element_size() * 8 if dense_bits is None else KV_BITS[kv_cache_qformat]
    source = "the in-memory PyTorch weights as stored" if dense_bits is None else (
        f"the deployed format: quantized linear weights at their format's bits, the rest at {dense_bits:g}"
        if quantized else f"every weight at {dense_bits:g} bits")
    return Tensors(sizes, embed_name, head_name, _kv_from_config(model.config, kv_bits), source)


def safetensors_header(file: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file (name -> dtype, shape, offsets), without loading any tensor."""
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return header


def from_safetensors(folder: Path, kv_cache_qformat: str = "none") -> Tensors:
    """A checkpoint folder: every tensor of its safetensors files; the KV geometry from its config.json."""
    sizes: dict[str, float] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, info in safetensors_header(file).items():
            start, end = info["data_offsets"]
            sizes[name] = float(end - start)
    embed = next((n for n in sizes if n.endswith("embed_tokens.weight")), None)
    head = next((n for n in sizes if n.endswith("lm_head.weight")), None) or embed  # absent: tied
    config = Path(folder) / "config.json"
    kv = _kv_from_config(json.loads(config.read_text()), KV_BITS[kv_cache_qformat]) if config.is_file() else 0.0
    return Tensors(sizes, embed, head, kv, "the checkpoint's safetensors files")


def from_gguf(path: Path) -> Tensors:
    """A GGUF file: every tensor's bytes as stored; the KV geometry from its metadata (llama.cpp keeps the
    KV cache in F16 unless told otherwise)."""
    gguf = read_gguf(path)
    sizes = {t.name: float(t.n_bytes) for t in gguf.tensors}
    get = gguf.arch_int
    layers, heads = get("block_count"), get("attention.head_count")
    kv = 0.0
    if layers and heads:
        head_dim = get("attention.key_length") or get("embedding_length") // heads
        kv = kv_bytes_per_token(layers, get("attention.head_count_kv") or heads, head_dim)
    head = "output.weight" if "output.weight" in sizes else "token_embd.weight"  # no output tensor: tied
    return Tensors(sizes, "token_embd.weight" if "token_embd.weight" in sizes else None, head, kv, "the GGUF file")
