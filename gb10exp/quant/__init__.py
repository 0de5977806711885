"""Quantization with NVIDIA Model Optimizer: calibrate, then replace layers by fake-quantized ones.

Every format is the modelopt config named in ``conf/qformat/<name>.yaml`` (kind=modelopt); ``bf16``
quantizes nothing; ``auto`` searches a per-layer mix of other formats (gb10exp/quant/auto.py).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gb10exp.config import Config, ConfigError, QFormatConfig
from gb10exp.quant.nvfp4_cpu import enable_cpu_nvfp4

log = logging.getLogger(__name__)

KV_CACHE_CFGS = {"fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG"}
QFORMAT_DIR = Path(__file__).resolve().parents[2] / "conf" / "qformat"


def quantizes(qformat: QFormatConfig) -> bool:
    """Whether modelopt quantizes (and calibrates) the model for this format."""
    return qformat.kind in ("modelopt", "auto")


def load_qformat(name: str) -> QFormatConfig:
    """The typed qformat option ``name`` (conf/qformat/<name>.yaml), e.g. a candidate of qformat=auto."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QFormatConfig), _qformat_node(name)))


def _qformat_node(name: str):
    """The option's YAML with the options its defaults list names (same group) merged in first."""
    from omegaconf import OmegaConf

    path = QFORMAT_DIR / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in QFORMAT_DIR.glob("*.yaml"))
        raise ConfigError(f"qformat option {name!r} does not exist: one of {options}")
    node = OmegaConf.load(path)
    bases = [_qformat_node(d) for d in node.pop("defaults", []) if d != "_self_"]
    return OmegaConf.merge(*bases, node) if bases else node


def modelopt_config(qformat: QFormatConfig, kv_cache_qformat: str = "none") -> dict | None:
    """A private copy of modelopt's config for the format, with KV-cache entries when asked for.

    For qformat=auto: the search settings and every candidate's config (what determines the result)."""
    if qformat.kind == "auto":
        return {
            "auto": dataclasses.asdict(qformat.auto),
            "formats": {f: modelopt_config(load_qformat(f)) for f in qformat.auto.formats},
        }
    if qformat.modelopt_cfg is None:
        return None
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, qformat.modelopt_cfg))
    if kv_cache_qformat != "none":
        kv = getattr(mtq, KV_CACHE_CFGS[kv_cache_qformat])["quant_cfg"]
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(list(kv))
    return cfg


class CalibrationLoop:
    """modelopt's forward_loop: run every calibration sample through the model once. auto_quantize reads
    the samples themselves (``batches``)."""

    def __init__(self, samples: torch.Tensor, batch_size: int, device: torch.device):
        self.samples, self.batch_size, self.device = samples, batch_size, device

    def batches(self, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        for batch in self.samples.split(batch_size or self.batch_size):
            yield batch.to(self.device)

    def __call__(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            total = -(-len(self.samples) // self.batch_size)
            for batch in tqdm(self.batches(), total=total, desc="calibrate", unit="batch", leave=False):
                model(batch)


def calibration_loop(samples: torch.Tensor, batch_size: int, device: torch.device) -> CalibrationLoop | None:
    """None without samples (a calibration-free format): modelopt's max calibration then sets weight scales
    from the weights alone."""
    return CalibrationLoop(samples, batch_size, device) if samples.numel() else None


def quantize(
    model: torch.nn.Module,
    qformat: QFormatConfig,
    forward_loop: CalibrationLoop | None,
    kv_cache_qformat: str = "none",
) -> torch.nn.Module:
    """Quantize ``model`` in place (calibrating with ``forward_loop``) and return it."""
    if not quantizes(qformat):
        return model
    if next(model.parameters()).device.type == "cpu":
        enable_cpu_nvfp4()
    if qformat.kind == "auto":
        from gb10exp.quant.auto import search

        return search(model, qformat, forward_loop)
    import modelopt.torch.quantization as mtq

    log.info("quantizing with modelopt %s", qformat.modelopt_cfg)
    return mtq.quantize(model, modelopt_config(qformat, kv_cache_qformat), forward_loop)


def is_quantized(model: torch.nn.Module) -> bool:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return any(isinstance(m, TensorQuantizer) and m.is_enabled for m in model.modules())


def _cuda_only(modelopt_cfg: dict) -> bool:
    """Formats with power-of-two (E8M0) block scales (MXFP4/6/8): modelopt 0.47 computes them only in its
    CUDA extension, and no plain-torch version of its numerics exists to route the CPU through."""
    for entry in modelopt_cfg.get("quant_cfg", []):
        cfgs = entry.get("cfg") or {}
        for c in cfgs if isinstance(cfgs, list) else [cfgs]:
            scale_bits = (c.get("block_sizes") or {}).get("scale_bits")
            if c.get("enable", entry.get("enable", True)) and scale_bits in ("e8m0", (8, 0)):
                return True
    return False


def _auto_candidate(formats: list[str], name: str) -> QFormatConfig:
    """One candidate of qformat=auto, its error naming the key the user typed."""
    try:
        return load_qformat(name)
    except ConfigError as e:
        raise ConfigError(f"qformat.auto.formats={formats} is not allowed: {e}") from None


def preflight_check(cfg: Config) -> None:
    """Cheap per-job checks (no model, no data): refuse, in one line, what cannot run on this machine."""
    qf = cfg.qformat
    if cfg.kv_cache_qformat != "none" and qf.kind != "modelopt":
        raise ConfigError(
            f"kv_cache_qformat={cfg.kv_cache_qformat!r} is not allowed with qformat={qf.name} (kind={qf.kind}): "
            "the KV cache is quantized alongside a modelopt format (e.g. qformat=fp8 or nvfp4); use kv_cache_qformat=none"
        )
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    formats = [_auto_candidate(qf.auto.formats, f) for f in qf.auto.formats] if qf.kind == "auto" else [qf]
    for f in formats:
        if qf.kind == "auto" and f.kind != "modelopt":
            raise ConfigError(
                f"qformat.auto.formats={qf.auto.formats} is not allowed: {f.name!r} is kind={f.kind}; "
                "list modelopt formats such as nvfp4, fp8, int4, w4a8_nvfp4_fp8"
            )
        if on_cpu and f.kind == "modelopt" and _cuda_only(modelopt_config(f)):
            raise ConfigError(
                f"qformat={f.name!r} is not allowed on the CPU: modelopt 0.47 computes its E8M0 "
                "block scales only in a CUDA extension; run it on a GPU (device=cuda) or pick "
                "nvfp4, w4a8_nvfp4_fp8 or fp8"
            )
    if qf.kind == "auto":
        lowest = min(f.weight_bits for f in formats)
        if qf.auto.effective_bits < lowest:
            raise ConfigError(
                f"qformat.auto.effective_bits={qf.auto.effective_bits} is not allowed: below the {lowest} bits of "
                f"the smallest of qformat.auto.formats={qf.auto.formats}; raise it or add a smaller format"
            )
