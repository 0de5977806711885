"""Quantization with NVIDIA Model Optimizer: calibrate, then replace layers by fake-quantized ones.

Every format is the modelopt config named in ``conf/qformat/<name>.yaml``; its facts (what it exports as,
its bits, whether it reads calibration data) come from ``formats.py``; ``bf16`` quantizes nothing;
``auto`` searches a per-layer mix of other formats (``auto.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from gb10exp import hardware
from gb10exp.config import Config, ConfigError, QFormatConfig
from gb10exp.quant import formats
from gb10exp.quant.auto import search
from gb10exp.quant.nvfp4_cpu import cpu_nvfp4

log = logging.getLogger(__name__)


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
    """Quantize ``model`` in place (calibrating with ``forward_loop``) and return it. On the CPU, run it
    inside ``cpu_nvfp4()`` (the runner wraps the whole job): its NVFP4 quantizers compute there."""
    fmt = formats.of(qformat, kv_cache_qformat)
    if not fmt.modelopt:
        return model
    with cpu_nvfp4():
        if fmt.kind == "auto":
            return search(model, qformat, forward_loop)
        import modelopt.torch.quantization as mtq

        log.info("quantizing with modelopt %s", qformat.modelopt_cfg)
        return mtq.quantize(model, formats.modelopt_config(qformat, kv_cache_qformat), forward_loop)


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
        raise ConfigError(
            f"kv_cache_qformat={cfg.kv_cache_qformat!r} is not allowed with qformat={qf.name} (kind={fmt.kind}): "
            "the KV cache is quantized alongside a modelopt format (e.g. qformat=fp8 or nvfp4); use kv_cache_qformat=none"
        )
    on_cpu = hardware.resolve(cfg.device).type == "cpu"
    for f in candidates or [fmt]:
        if fmt.kind == "auto" and f.kind != "modelopt":
            raise ConfigError(
                f"qformat.auto.formats={qf.auto.formats} is not allowed: {f.name!r} is kind={f.kind}; "
                "list modelopt formats such as nvfp4, fp8, int4, w4a8_nvfp4_fp8"
            )
        if on_cpu and f.cuda_only:
            raise ConfigError(
                f"qformat={f.name!r} is not allowed on the CPU: modelopt 0.47 computes its E8M0 "
                "block scales only in a CUDA extension; run it on a GPU (device=cuda) or pick "
                "nvfp4, w4a8_nvfp4_fp8 or fp8"
            )
    if fmt.kind == "auto":
        lowest = min(f.weight_bits for f in candidates)
        if qf.auto.effective_bits < lowest:
            raise ConfigError(
                f"qformat.auto.effective_bits={qf.auto.effective_bits} is not allowed: below the {lowest} bits of "
                f"the smallest of qformat.auto.formats={qf.auto.formats}; raise it or add a smaller format"
            )
