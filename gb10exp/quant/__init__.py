"""Quantization with NVIDIA Model Optimizer: calibrate, then replace layers by fake-quantized ones.

Every format is the modelopt config named in ``conf/qformat/<name>.yaml``, its facts derived in
``formats.py``; ``bf16`` quantizes nothing; ``auto`` searches a per-layer mix of formats (``auto.py``).
``quant.layerwise=true`` calibrates one decoder layer at a time (modelopt's layerwise calibration), and
``quant.offload_dir`` keeps the decoder layers on disk meanwhile (gb10exp/models/offload.py,
docs/large_models.md).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from gb10exp import hardware
from gb10exp.config import Config, ConfigError, QFormatConfig
from gb10exp.quant import formats
from gb10exp.quant.auto import search
from gb10exp.quant.nvfp4_cpu import cpu_nvfp4
from gb10exp.utils import check_writable

log = logging.getLogger(__name__)


class CalibrationLoop:
    """modelopt's forward_loop: every calibration sample through the model once (auto_quantize: batches)."""

    def __init__(self, samples: torch.Tensor, batch_size: int, device: torch.device):
        self.samples, self.batch_size, self.device = samples, batch_size, device

    def batches(self, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        yield from (batch.to(self.device) for batch in self.samples.split(batch_size or self.batch_size))

    def __call__(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            total = -(-len(self.samples) // self.batch_size)
            for batch in tqdm(self.batches(), total=total, desc="calibrate", unit="batch", leave=False):
                model(batch)


def calibration_loop(samples: torch.Tensor, batch_size: int, device: torch.device) -> CalibrationLoop | None:
    """None without samples (a calibration-free format): modelopt's max calibration then sets weight scales
    from the weights alone."""
    return CalibrationLoop(samples, batch_size, device) if samples.numel() else None


# Calibration algorithms that only set scales (amax) and never write weights: the only ones that can calibrate a
# disk-offloaded model, since modelopt 0.47 keeps every written-back offloaded weight in memory for good
# (``_writeback_params_to_weights_map``: "writing updates back to disk offload files is TODO").
AMAX_ONLY = ("max", "mse", "local_hessian")
# What drives a layerwise pass of a format that reads no calibration data (weight-only round-to-nearest): its
# weight scales come from the weights alone, so any tokens do; modelopt's layerwise calibration needs some.
WEIGHT_ONLY_TOKENS = 8


def layerwise_config(modelopt_cfg: dict, offloaded: bool) -> dict:
    """``modelopt_cfg`` with layerwise calibration on. With the default get_qdq_activations_from_prev_layer=False
    every layer sees the full-precision activations it would see in one whole-model pass: max calibration gives
    bit-identical scales. ``calib_mutates_weights=False`` (amax-only algorithms) keeps offloaded weights on disk."""
    cfg = copy.deepcopy(modelopt_cfg)
    algorithm = cfg.get("algorithm", "max")
    algorithm = {"method": algorithm} if isinstance(algorithm, str) else dict(algorithm)
    algorithm["layerwise"] = {"enable": True, **({"calib_mutates_weights": False} if offloaded else {})}
    cfg["algorithm"] = algorithm
    return cfg


def quantize(model: torch.nn.Module, qformat: QFormatConfig, forward_loop: CalibrationLoop | None,
             kv_cache_qformat: str = "none", layerwise: bool = False, offloaded: bool = False,
             device: torch.device | None = None) -> torch.nn.Module:
    """Quantize ``model`` in place (calibrating with ``forward_loop``) and return it. On the CPU, run it
    inside ``cpu_nvfp4()`` (the runner wraps the whole job): its NVFP4 quantizers compute there.
    ``layerwise``: one decoder layer at a time; ``offloaded``: the model's layers are on disk (accelerate hooks)."""
    fmt = formats.of(qformat, kv_cache_qformat)
    if not fmt.modelopt:
        return model
    with cpu_nvfp4():
        if fmt.kind == "auto":
            return search(model, qformat, forward_loop)
        import modelopt.torch.quantization as mtq

        cfg = formats.modelopt_config(qformat, kv_cache_qformat)
        if layerwise:
            cfg = layerwise_config(cfg, offloaded)
            if forward_loop is None:
                forward_loop = CalibrationLoop(torch.zeros((1, WEIGHT_ONLY_TOKENS), dtype=torch.long), 1,
                                               device or torch.device("cpu"))
            log.info("layerwise calibration: the calibration data runs once per decoder layer")
        log.info("quantizing with modelopt %s%s", qformat.modelopt_cfg, " (layerwise)" if layerwise else "")
        model = mtq.quantize(model, cfg, forward_loop)
        if layerwise:
            _check_calibrated_outside_layers(model)
        return model


def _check_calibrated_outside_layers(model: torch.nn.Module) -> None:
    """Layerwise calibration calibrates the decoder layers only: an enabled quantizer elsewhere (lm_head, the
    embedding) would keep no scale. No gb10exp format enables one; a modelopt config that does must fail here."""
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    layers = LayerActivationCollector.get_decoder_layers(model)
    inside = {id(m) for m in layers.modules()} if layers is not None else set()
    outside = [n for n, m in model.named_modules()
               if isinstance(m, TensorQuantizer) and m.is_enabled and id(m) not in inside]
    if outside:
        raise RuntimeError(f"quant.layerwise=true leaves {len(outside)} enabled quantizers outside the decoder layers "
                           f"uncalibrated (e.g. {outside[0]}); run this format with quant.layerwise=false")


class Unquantized(torch.nn.Module):
    """The unquantized reference of KL and top-1 for a model too large for a copy (``quant.offload_dir``):
    each call runs ``model`` with every quantizer off, which gives the unquantized model's outputs exactly
    (amax-only algorithms change no weight) without a second copy of the weights."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.__dict__["quantized"] = model  # not a submodule: nothing of it is registered twice

    def forward(self, *args, **kwargs):
        from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context

        with set_quantizer_by_cfg_context(self.quantized, [{"quantizer_name": "*", "enable": False}]):
            return self.quantized(*args, **kwargs)


def _auto_candidate(names: list[str], name: str) -> formats.Format:
    """One candidate of qformat=auto, its error naming the key the user typed."""
    if name not in formats.options():
        raise ConfigError(f"qformat.auto.formats={names} is not allowed: {name!r} is not a qformat option; "
                          f"one of {formats.options()}")
    return formats.of(formats.load_qformat(name))


def check(cfg: Config) -> None:
    """Preflight, per job (no model, no data): refuse, in one line, a format that cannot be made here."""
    qf = cfg.qformat
    candidates = [_auto_candidate(qf.auto.formats, f) for f in qf.auto.formats] if qf.auto is not None else []
    fmt = formats.of(qf, cfg.kv_cache_qformat)
    if cfg.kv_cache_qformat != "none" and fmt.kind != "modelopt":
        raise ConfigError(f"kv_cache_qformat={cfg.kv_cache_qformat!r} is not allowed with qformat={qf.name} "
                          f"(kind={fmt.kind}): the KV cache is quantized alongside a modelopt format (e.g. "
                          "qformat=fp8 or nvfp4); use kv_cache_qformat=none")
    on_cpu = hardware.resolve(cfg.device).type == "cpu"
    for f in candidates or [fmt]:
        if fmt.kind == "auto" and f.kind != "modelopt":
            raise ConfigError(f"qformat.auto.formats={qf.auto.formats} is not allowed: {f.name!r} is "
                              f"kind={f.kind}; list modelopt formats such as nvfp4, fp8, int4, "
                              "w4a8_nvfp4_fp8")
        if on_cpu and f.cuda_only:
            raise ConfigError(f"qformat={f.name!r} is not allowed on the CPU: modelopt 0.47 computes its "
                              "E8M0 block scales only in a CUDA extension; run it on a GPU (device=cuda) or "
                              "pick nvfp4, w4a8_nvfp4_fp8 or fp8")
    check_layerwise(cfg, fmt)
    if fmt.kind == "auto":
        lowest = min(f.weight_bits for f in candidates)
        if qf.auto.effective_bits < lowest:
            raise ConfigError(f"qformat.auto.effective_bits={qf.auto.effective_bits} is not allowed: below "
                              f"the {lowest} bits of the smallest of qformat.auto.formats={qf.auto.formats}; "
                              "raise it or add a smaller format")


def check_layerwise(cfg: Config, fmt: formats.Format) -> None:
    """``quant.layerwise`` / ``quant.offload_dir``: what they cannot do, in one line each (docs/large_models.md)."""
    q = cfg.quant
    if not q.layerwise:
        return
    if fmt.kind != "modelopt":
        raise ConfigError(f"quant.layerwise=true is not allowed with qformat={fmt.name} (kind={fmt.kind}): it calibrates "
                          "modelopt formats layer by layer (auto_quantize scores whole models); pick e.g. "
                          "qformat=nvfp4, fp8 or nvfp4_wo, or drop quant.layerwise")
    method = formats.algorithm(formats.modelopt_config(cfg.qformat, cfg.kv_cache_qformat))
    if method not in AMAX_ONLY:
        raise ConfigError(f"quant.layerwise=true is not allowed with qformat={fmt.name} (algorithm {method}): only "
                          f"scale-only algorithms {list(AMAX_ONLY)} calibrate offloaded layers without pulling every "
                          "weight back into memory (AWQ, SmoothQuant, GPTQ and SVDQuant rewrite weights); pick "
                          "qformat=nvfp4, nvfp4_mse, fp8 or nvfp4_wo, or drop quant.layerwise")
    if q.offload_dir is None:
        return
    if cfg.model.source == "random" or cfg.model.gguf_file or (cfg.model.path or "").endswith(".gguf"):
        raise ConfigError(f"quant.offload_dir={q.offload_dir!r} is not allowed with model={cfg.model.name} (source="
                          f"{cfg.model.source}): it streams safetensors files, and this model has none (GGUF "
                          "files are dequantized in memory); use a Hugging Face model folder or hub id")
    if cfg.backend.name != "hf":
        raise ConfigError(f"quant.offload_dir={q.offload_dir!r} is not allowed with backend={cfg.backend.name}: the "
                          "engine would load the whole model (and its unquantized reference) into memory; use "
                          "backend=hf with export=true, then serve the checkpoint")
    check_writable(q.offload_dir, "quant.offload_dir")
    if cfg.bench.enabled and cfg.bench.measure_fake_quant:
        raise ConfigError("bench.measure_fake_quant=true is not allowed with quant.offload_dir: it would time reading "
                          "every layer from disk at each token; set bench.measure_fake_quant=false")
    if cfg.eval.tasks:
        raise ConfigError(f"eval.tasks={cfg.eval.tasks} is not allowed with quant.offload_dir (lm-eval is not run "
                          "on offloaded models yet); drop eval.tasks or quant.offload_dir")
