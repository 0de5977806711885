"""The recipe of one job: prepare, load, calibrate, quantize, evaluate, benchmark, record.

Everything cheap that can fail (config values, model path, token, data, tracking store, backend) is
checked in ``prepare`` before an MLflow run exists, so bad input costs seconds and leaves no record.
From ``Recorder.run`` on, any exception marks the run FAILED with its traceback.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from gb10exp import data
from gb10exp.backends import Backend, BenchInputs, get_backend
from gb10exp.config import Config
from gb10exp.evaluate import evaluate_accuracy
from gb10exp.models import check_model, load_model, load_tokenizer, resolve_device, resolve_dtype
from gb10exp.quant import calibration_loop, quantize
from gb10exp.tracking import Recorder, check_store, config_hash
from gb10exp.tracking.environment import environment

log = logging.getLogger(__name__)


class NonFiniteMetric(RuntimeError):
    """A metric came out NaN or infinite: the run fails rather than recording it."""


@dataclass
class Prepared:
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    calib: torch.Tensor  # (calib_size, seq_len)
    windows: torch.Tensor  # (num_windows, seq_len)
    backend: Backend
    recorder: Recorder


def prepare(cfg: Config) -> Prepared:
    """Every cheap check, in the order a user would fix them; no MLflow run exists yet."""
    device = resolve_device(cfg.device)
    check_model(cfg.model)
    check_store(cfg.tracking)
    backend = get_backend(cfg.backend)
    backend.check()
    tokenizer = load_tokenizer(cfg.model)
    calib = data.calib_samples(
        data.tokenize(data.load_text("calib", cfg.calib), tokenizer), cfg.calib.seq_len, cfg.calib_size, cfg.seed
    )
    windows = data.eval_windows(
        data.tokenize(data.load_text("eval", cfg.eval), tokenizer), cfg.eval.seq_len, cfg.eval.num_windows
    )
    return Prepared(device, resolve_dtype(cfg.model.dtype, device), tokenizer, calib, windows, backend,
                    Recorder(cfg.tracking))


def run_name(cfg: Config) -> str:
    return cfg.tracking.run_name or f"{cfg.model.name}-{cfg.qformat.name}-calib{cfg.calib_size}-{cfg.backend.name}"


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    bad = {k: v for k, v in metrics.items() if v is not None and not math.isfinite(v)}
    if bad:
        raise NonFiniteMetric(f"non-finite metrics {bad}: the quantized model's outputs overflowed or are NaN")
    return metrics


def run(cfg: Config, resolved: dict, overrides: list[str], sweep_tags: dict[str, str]) -> dict[str, Any]:
    """Run one job and return its results (the same dict that is logged as results.json)."""
    p = prepare(cfg)
    hash_ = config_hash(resolved)
    if not cfg.force and (done := p.recorder.find_finished(hash_)):
        log.info("skipping %s: identical run %s already finished (force=true reruns)", run_name(cfg), done)
        return {"skipped": True, "run_id": done}

    quantizing = cfg.qformat.modelopt_cfg is not None
    tags = environment(p.device) | sweep_tags | {
        "config_hash": hash_, "qformat": cfg.qformat.name, "model": cfg.model.name, "backend": cfg.backend.name,
        "compute_dtype": str(p.dtype).removeprefix("torch."),
        "quantization": "fake (modelopt simulated)" if quantizing else "none",
    }
    with p.recorder.run(run_name(cfg), resolved, overrides, tags) as rec:
        timers: dict[str, float] = {}
        start = time.perf_counter()

        model = load_model(cfg.model, p.device, p.dtype)
        timers["load_s"] = time.perf_counter() - start

        # The baseline keeps the unquantized weights for KL divergence and top-1 agreement.
        baseline = copy.deepcopy(model) if quantizing and cfg.eval.compare_baseline else None
        t = time.perf_counter()
        model = quantize(model, cfg.qformat, calibration_loop(p.calib, cfg.calib.batch_size, p.device),
                         cfg.kv_cache_qformat)
        timers["quantize_s"] = time.perf_counter() - t

        t = time.perf_counter()
        accuracy = evaluate_accuracy(model, p.windows, cfg.eval.batch_size, p.device, baseline)
        del baseline
        timers["evaluate_s"] = time.perf_counter() - t
        metrics = accuracy.metrics()
        if not quantizing:  # the baseline compared with itself, by definition
            metrics |= {"kl_mean": 0.0, "top1_agreement": 1.0}
        metrics["weight_gib"] = weight_bytes(model, cfg.qformat.weight_bits) / 2**30
        _finite(metrics)

        if cfg.bench.enabled:
            t = time.perf_counter()
            prompt = p.windows.flatten()
            bench, bench_tags = p.backend.benchmark(
                BenchInputs(model, p.tokenizer, prompt, p.device, quantizing), cfg.bench
            )
            timers["benchmark_s"] = time.perf_counter() - t
            metrics |= _finite(bench)
            rec.set_tags(bench_tags)

        timers["total_s"] = time.perf_counter() - start
        metrics |= timers
        rec.log_metrics(metrics)
        results = {"run_id": rec.run_id, "name": run_name(cfg), "metrics": metrics,
                   "windows": accuracy.as_dict()["windows"], "tags": tags}
        rec.log_dict(results, "results.json")
    return results


def weight_bytes(model: torch.nn.Module, bits_per_weight: float) -> float:
    """Bytes of the deployed weights: quantized linear layers at the format's bits per weight (scales
    included), everything else (embeddings, norms, lm_head) at 16 bits."""
    quantized = 0
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if isinstance(module, torch.nn.Linear) and quantizer is not None and quantizer.is_enabled:
            quantized += module.weight.numel()
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() not in seen:  # tied embeddings count once
            seen.add(param.data_ptr())
            total += param.numel()
    return quantized * bits_per_weight / 8 + (total - quantized) * 2
