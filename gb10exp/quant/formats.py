"""What a quantization format is: every fact of it, derived once from its modelopt config.

A ``conf/qformat/<name>.yaml`` says only what cannot be derived (name, modelopt config or llama.cpp GGUF
type, description, auto's search settings); ``of`` derives the rest with one walk over modelopt's
``quant_cfg``, asking for each linear layer of a Llama block which quantizers are enabled with which
attributes, exactly as ``mtq.quantize`` would set them:
- ``quant_algo``: hf_quant_config.json's ``quant_algo`` in modelopt's export (the rules of
  ``modelopt.torch.export.quant_utils.get_quantization_format``; several per-layer formats make
  MIXED_PRECISION); it keys the engine support matrix (gb10exp/backends/support.py);
- ``weight_bits`` (element bits + block-scale bits per weight) and ``weight_block``;
- ``nvfp4`` (any quantizer with E2M1 values and E4M3 block scales), ``cuda_only`` (E8M0 block scales, which
  modelopt computes only in its CUDA extension);
- ``needs_data``: why calibration reads data (a non-max algorithm, an enabled activation quantizer), None
  when the result cannot depend on it (weight-only round-to-nearest): such jobs skip calibration.
``from_params`` rebuilds the same object from a run's MLflow params (reports, the sweep table), so every
reader of a run agrees with the run.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gb10exp.config import AutoConfig, ConfigError, QFormatConfig

QFORMAT_DIR = Path(__file__).resolve().parents[2] / "conf" / "qformat"
KV_CACHE_CFGS = {"fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG"}
DENSE_BITS = 16.0  # what unquantized tensors are deployed at (bf16 / fp16)
# llama.cpp's types: bits per weight, scales included (ggml's block sizes: Q4_K 144 bytes per 256 weights,
# Q6_K 210, Q8_0 34 per 32, NVFP4 36 per 64...). Q4_K_M mixes Q4_K with Q6_K for some tensors: 4.85 on
# Llama-class models (llama.cpp's quantize tool). The engine's real bytes come from the GGUF file itself.
GGUF_BITS = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K_M": 5.7, "Q5_K_S": 5.5,
             "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_0": 4.5, "Q4_1": 5.0, "Q3_K_M": 3.9, "Q2_K": 2.625,
             "NVFP4": 4.5}
# One Llama block's linear layers: the probes the walk asks about (the output head is never quantized:
# every modelopt config disables "*lm_head*").
LINEARS = tuple(f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                 "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
KV_PROBES = ("model.layers.0.self_attn.k_bmm_quantizer", "model.layers.0.self_attn.v_bmm_quantizer")
E4M3, E8M0, E2M1 = (4, 3), (8, 0), (2, 1)
AWQ_PRE_SCALE = ("awq_lite", "awq_full")  # algorithms that leave a pre-quant scale on the input quantizer


@dataclass(frozen=True)
class Format:
    """The facts of one format (see the module's docstring); the same object for a job and its run."""

    name: str
    kind: str  # none | modelopt | auto | gguf
    quant_algo: str | None  # hf_quant_config.json quant_algo of modelopt's export; None: not a modelopt export
    weight_bits: float  # bits per quantized weight, scales included; 16 when nothing is quantized
    weight_block: int | None  # the weight quantizer's block along the input dimension (NVFP4 16, INT4 128)
    nvfp4: bool
    cuda_only: bool
    needs_data: str | None  # why calibration reads data; None: the result cannot depend on it
    gguf_type: str | None = None
    modelopt_cfg: str | None = None
    candidates: tuple[str, ...] = ()  # qformat=auto: the formats its layers choose from

    @property
    def modelopt(self) -> bool:
        """modelopt quantizes the model (fake quantization in PyTorch)."""
        return self.kind in ("modelopt", "auto")

    @property
    def quantized(self) -> bool:
        return self.kind != "none"

    @property
    def calibrates(self) -> bool:
        """The job runs calibration data through the model."""
        return self.modelopt and self.needs_data is not None

    @property
    def row(self) -> str:
        """The engine support matrix's row: the quant_algo, ``GGUF`` for llama.cpp's types, ``none``."""
        return {"gguf": "GGUF", "none": "none"}.get(self.kind) or self.quant_algo or "unknown"

    @property
    def calibration_skipped(self) -> str:
        """Why a job of this format reads no calibration data (its ``calibration`` tag when it reads none)."""
        return {"none": "none", "gguf": "none: llama.cpp's quantizer reads no calibration data"}.get(
            self.kind, "skipped: weight-only round-to-nearest, max calibration reads the weights alone")

    def tags(self) -> dict[str, str]:
        """The derived facts as run tags (``format.*``): what the run's numbers are of."""
        return {"format.quant_algo": self.quant_algo or "none", "format.weight_bits": f"{self.weight_bits:g}",
                "format.calibration": self.needs_data or "none: the result cannot depend on calibration data"}


def kind_of(q: QFormatConfig) -> str:
    return "auto" if q.auto is not None else "gguf" if q.gguf_type else "modelopt" if q.modelopt_cfg else "none"


def load_qformat(name: str) -> QFormatConfig:
    """The typed qformat option ``name`` (conf/qformat/<name>.yaml), e.g. a candidate of qformat=auto."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QFormatConfig), _qformat_node(name)))


def options() -> list[str]:
    return sorted(p.stem for p in QFORMAT_DIR.glob("*.yaml"))


def _qformat_node(name: str):
    """The option's YAML with the options its defaults list names (same group) merged in first."""
    from omegaconf import OmegaConf

    path = QFORMAT_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"qformat={name!r} is not allowed: one of {options()}")
    node = OmegaConf.load(path)
    bases = [_qformat_node(d) for d in node.pop("defaults", []) if d != "_self_"]
    return OmegaConf.merge(*bases, node) if bases else node


def modelopt_config(q: QFormatConfig, kv_cache_qformat: str = "none") -> dict | None:
    """A private copy of modelopt's config for the format, with KV-cache entries when asked for; for
    qformat=auto, the search settings and every candidate's config (what determines the result)."""
    if q.auto is not None:
        return {"auto": dataclasses.asdict(q.auto),
                "formats": {f: modelopt_config(load_qformat(f)) for f in q.auto.formats}}
    if q.modelopt_cfg is None:
        return None
    import modelopt.torch.quantization as mtq

    if not hasattr(mtq, q.modelopt_cfg):
        raise ConfigError(f"qformat.modelopt_cfg={q.modelopt_cfg!r} is not allowed: modelopt.torch.quantization "
                          "has no such config (e.g. NVFP4_DEFAULT_CFG, FP8_DEFAULT_CFG)")
    cfg = copy.deepcopy(getattr(mtq, q.modelopt_cfg))
    if kv_cache_qformat != "none":
        kv = getattr(mtq, KV_CACHE_CFGS[kv_cache_qformat])["quant_cfg"]
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(list(kv))
    return cfg


# -- the walk ---------------------------------------------------------------------------------------------
def _attrs(cfg: Any) -> dict | list[dict]:
    """A quantizer's attributes as plain dicts (a list of them for a sequential quantizer)."""
    if isinstance(cfg, list):
        return [_attrs(c) for c in cfg]
    return cfg.model_dump() if hasattr(cfg, "model_dump") else dict(cfg)


def _quantizers(modelopt_cfg: dict) -> dict[str, dict | list[dict] | None]:
    """Every probed quantizer's attributes as ``mtq.quantize`` sets them (None: disabled): the config's
    entries in order, a later match overriding an earlier one, as modelopt applies them."""
    from modelopt.torch.quantization.config import normalize_quant_cfg_list

    probes = [f"{m}.{q}" for m in LINEARS for q in ("weight_quantizer", "input_quantizer", "output_quantizer")]
    state: dict[str, tuple[bool, Any]] = {p: (True, None) for p in [*probes, *KV_PROBES]}
    for entry in normalize_quant_cfg_list(modelopt_cfg["quant_cfg"]):
        if entry.get("parent_class") not in (None, "nn.Linear"):
            continue
        for probe, (_, attrs) in state.items():
            if fnmatch.fnmatch(probe, entry["quantizer_name"]):
                cfg = entry.get("cfg")
                state[probe] = (entry["enable"], _attrs(cfg) if cfg is not None else attrs)
    return {p: attrs if enabled and attrs is not None else None for p, (enabled, attrs) in state.items()}


def _first(attrs: dict | list[dict]) -> dict:
    return attrs[0] if isinstance(attrs, list) else attrs


def _bits_tuple(num_bits: Any) -> Any:
    return tuple(num_bits) if isinstance(num_bits, list) else num_bits


def bits_per_value(num_bits: Any, block_sizes: dict | None) -> float:
    """Bits per quantized value, scales included: element bits (E2M1: 4, E4M3: 8, INT4: 4) plus the block
    scale spread over its block (8 bits for FP8 or E8M0 scales, 16 for integer formats' scales).
    Per-tensor and per-channel scales count as nothing."""
    num_bits = _bits_tuple(num_bits)
    bits = float(sum(num_bits) + 1 if isinstance(num_bits, tuple) else num_bits)
    block = (block_sizes or {}).get(-1)
    if block:
        bits += (8.0 if (block_sizes or {}).get("scale_bits") is not None else 16.0) / block
    return bits


def quantizer_bits(quantizer: Any) -> float:
    """Bits per weight of a model's weight quantizer, scales included (16 when it is off): what that layer is
    deployed at. A sequential quantizer (W4A8: INT4 then FP8) stores its first stage."""
    if not getattr(quantizer, "is_enabled", False):
        return DENSE_BITS
    if hasattr(quantizer, "__getitem__") and not hasattr(quantizer, "num_bits"):  # SequentialQuantizer
        quantizer = quantizer[0]
    return bits_per_value(quantizer.num_bits, quantizer.block_sizes)


def _layer_algo(weight: dict | list[dict] | None, inputs: dict | None, method: str) -> str | None:
    """One linear layer's quant_algo, as modelopt's ``get_quantization_format`` decides it."""
    if weight is None:
        return None
    if isinstance(weight, list):
        return "W4A8_AWQ"  # INT4 then FP8: modelopt's only sequential weight quantizer
    num_bits, blocks = _bits_tuple(weight["num_bits"]), weight.get("block_sizes") or {}
    scale, dynamic = _bits_tuple(blocks.get("scale_bits")), blocks.get("type", "static") == "dynamic"
    if num_bits == 4:
        return "W4A16_AWQ"
    if num_bits == 8:
        return "W8A8_SQ_PER_CHANNEL" if inputs is not None else "W8A16"
    if num_bits == E4M3:
        if blocks.get(-1):
            return "MXFP8" if dynamic and scale == E8M0 else "FP8_PB"
        return "FP8_PER_CHANNEL_PER_TOKEN" if weight.get("axis") == 0 else "FP8"
    if num_bits == E2M1:
        if method == "svdquant" and inputs is not None:
            return "NVFP4_SVD"
        if method in AWQ_PRE_SCALE and inputs is not None:
            return "NVFP4_AWQ"
        if inputs is None:
            return "W4A16_NVFP4" if scale == E4M3 else None
        fp8_inputs = _bits_tuple(inputs["num_bits"]) == E4M3 and not inputs.get("block_sizes")
        if dynamic and fp8_inputs:
            return {E8M0: "W4A8_MXFP4_FP8", E4M3: "W4A8_NVFP4_FP8"}.get(scale)
        return {E4M3: "NVFP4", E8M0: "mxfp4"}.get(scale)  # modelopt 0.47 writes mxfp4 in lower case
    return None  # e.g. MXFP6's E3M2: modelopt's export raises on it


def algorithm(modelopt_cfg: dict) -> str | None:
    """The calibration algorithm's name (max, awq_lite, mse...; None: no calibration)."""
    algorithm = modelopt_cfg.get("algorithm", "max")
    return algorithm.get("method") if isinstance(algorithm, dict) else algorithm


def _modelopt_facts(modelopt_cfg: dict) -> dict[str, Any]:
    quantizers = _quantizers(modelopt_cfg)
    method = algorithm(modelopt_cfg)
    layers = {m: _layer_algo(quantizers[f"{m}.weight_quantizer"], quantizers[f"{m}.input_quantizer"], method)
              for m in LINEARS}
    algos = sorted({a for a in layers.values() if a is not None})
    weights = [quantizers[f"{m}.weight_quantizer"] for m in LINEARS if quantizers[f"{m}.weight_quantizer"]]
    first = _first(weights[0]) if weights else None
    enabled = [a for attrs in quantizers.values() if attrs is not None for a in (attrs if isinstance(attrs, list) else [attrs])]
    scales = {_bits_tuple((a.get("block_sizes") or {}).get("scale_bits")) for a in enabled}
    nvfp4 = any(_bits_tuple(a["num_bits"]) == E2M1 and _bits_tuple((a.get("block_sizes") or {}).get("scale_bits")) == E4M3
                for a in enabled)
    reads = sorted({p.rsplit(".", 1)[1] for p, a in quantizers.items() if a is not None and "weight" not in p})
    needs = (f"its algorithm {method!r} reads activations" if method not in ("max", None)
             else f"it enables activation quantizers ({', '.join(reads)})" if reads else None)
    return {"quant_algo": algos[0] if len(algos) == 1 else "MIXED_PRECISION" if algos else None,
            "weight_bits": bits_per_value(first["num_bits"], first.get("block_sizes")) if first else DENSE_BITS,
            "weight_block": (first.get("block_sizes") or {}).get(-1) if first else None,
            "nvfp4": nvfp4, "cuda_only": E8M0 in scales, "needs_data": needs}


_FACTS: dict[tuple[str, str], Format] = {}


def of(q: QFormatConfig, kv_cache_qformat: str = "none") -> Format:
    """The facts of qformat ``q`` (with KV-cache quantization ``kv_cache_qformat``); derived once per setting."""
    key = (repr(q), kv_cache_qformat)  # the dataclass repr holds every field, auto's settings included
    if key not in _FACTS:
        _FACTS[key] = _derive(q, kv_cache_qformat)
    return _FACTS[key]


def _derive(q: QFormatConfig, kv_cache_qformat: str) -> Format:
    kind = kind_of(q)
    base = {"name": q.name, "kind": kind, "gguf_type": q.gguf_type, "modelopt_cfg": q.modelopt_cfg}
    if kind == "none":
        return Format(**base, quant_algo=None, weight_bits=DENSE_BITS, weight_block=None, nvfp4=False,
                      cuda_only=False, needs_data=None)
    if kind == "gguf":
        return Format(**base, quant_algo=None, weight_bits=GGUF_BITS.get(q.gguf_type, DENSE_BITS), weight_block=None,
                      nvfp4=q.gguf_type == "NVFP4", cuda_only=False, needs_data=None)
    if kind == "auto":
        candidates = [of(load_qformat(f)) for f in q.auto.formats]
        return Format(**base, quant_algo="MIXED_PRECISION", weight_bits=q.auto.effective_bits, weight_block=None,
                      nvfp4=any(c.nvfp4 for c in candidates), cuda_only=any(c.cuda_only for c in candidates),
                      needs_data="auto_quantize scores every layer's candidates on calibration data",
                      candidates=tuple(q.auto.formats))
    return Format(**base, **_modelopt_facts(modelopt_config(q, kv_cache_qformat)))


NONE = ("None", "null", "")  # how MLflow params spell a null


def from_params(params: dict[str, str]) -> Format:
    """The facts of a run's format, from its MLflow params (``qformat.*`` and ``kv_cache_qformat``); runs
    recorded before a field existed get its default."""
    def get(key: str) -> str | None:
        value = params.get(f"qformat.{key}")
        return None if value in NONE or value is None else value

    auto = None
    if get("kind") == "auto" or get("auto.formats"):
        formats = json.loads((get("auto.formats") or '["nvfp4", "fp8"]').replace("'", '"'))
        auto = AutoConfig(formats=formats, effective_bits=float(get("auto.effective_bits") or 6.0),
                          method=get("auto.method") or "kl_div", score_samples=int(get("auto.score_samples") or 1))
    q = QFormatConfig(name=get("name") or "?", modelopt_cfg=get("modelopt_cfg"), gguf_type=get("gguf_type"),
                      description=get("description") or "", auto=auto)
    try:
        return of(q, params.get("kv_cache_qformat") or "none")
    except ConfigError:  # a config this modelopt no longer has: what the run recorded, as far as it goes
        return Format(q.name, kind_of(q), get("quant_algo"), float(get("weight_bits") or DENSE_BITS), None,
                      False, False, None if get("uses_calibration") == "False" else "recorded by an older run",
                      q.gguf_type, q.modelopt_cfg)
