"""Quantization with NVIDIA Model Optimizer: calibrate, then replace layers by fake-quantized ones.

Every format is the modelopt config named in ``conf/qformat/<name>.yaml``; ``bf16`` quantizes nothing.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from gb10exp.config import QFormatConfig
from gb10exp.quant.nvfp4_cpu import enable_cpu_nvfp4

log = logging.getLogger(__name__)

KV_CACHE_CFGS = {"fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG"}


def modelopt_config(qformat: QFormatConfig, kv_cache_qformat: str = "none") -> dict | None:
    """A private copy of modelopt's config for the format, with KV-cache entries when asked for."""
    if qformat.modelopt_cfg is None:
        return None
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, qformat.modelopt_cfg))
    if kv_cache_qformat != "none":
        kv = getattr(mtq, KV_CACHE_CFGS[kv_cache_qformat])["quant_cfg"]
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(list(kv))
    return cfg


def calibration_loop(samples: torch.Tensor, batch_size: int, device: torch.device) -> Callable | None:
    """modelopt's forward_loop: run every calibration sample through the model once. None without samples
    (a calibration-free format): modelopt's max calibration then sets weight scales from the weights alone."""
    if samples.numel() == 0:
        return None

    def forward_loop(model: torch.nn.Module) -> None:
        batches = samples.split(batch_size)
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrate", unit="batch", leave=False):
                model(batch.to(device))

    return forward_loop


def quantize(
    model: torch.nn.Module,
    qformat: QFormatConfig,
    forward_loop: Callable | None,
    kv_cache_qformat: str = "none",
) -> torch.nn.Module:
    """Quantize ``model`` in place (calibrating with ``forward_loop``) and return it."""
    cfg = modelopt_config(qformat, kv_cache_qformat)
    if cfg is None:
        return model
    import modelopt.torch.quantization as mtq

    if next(model.parameters()).device.type == "cpu":
        enable_cpu_nvfp4()
    log.info("quantizing with modelopt %s", qformat.modelopt_cfg)
    return mtq.quantize(model, cfg, forward_loop)


def is_quantized(model: torch.nn.Module) -> bool:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return any(isinstance(m, TensorQuantizer) and m.is_enabled for m in model.modules())
