"""The recipe of one job: prepare, load, calibrate, quantize, evaluate, benchmark, record.

Everything cheap that can fail (config values, model path, token, data, tracking store, backend) is
checked in ``prepare`` before an MLflow run exists, so bad input costs seconds and leaves no record.
From ``Recorder.run`` on, any exception marks the run FAILED with its traceback.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gb10exp import data
from gb10exp.backends import Backend, BenchInputs, get_backend, support
from gb10exp.bench import speed_only
from gb10exp.bench.accuracy import engine_accuracy
from gb10exp.config import Config
from gb10exp.evaluate import evaluate_accuracy
from gb10exp.evaluate.tasks import check_tasks, run_tasks
from gb10exp.isolation import restored_globals
from gb10exp.models import check_model, load_model, load_tokenizer, resolve_device, resolve_dtype
from gb10exp.quant import auto, cache, export, quantizes
from gb10exp.quant.bytes import deployed_decode_bytes, deployed_weight_bytes
from gb10exp.tracking import Recorder, check_store
from gb10exp.tracking.environment import environment
from gb10exp.tracking.identity import calibrates, run_identity
from gb10exp.tracking.ui import dataset_inputs, run_note

log = logging.getLogger(__name__)


class NonFiniteMetric(RuntimeError):
    """A metric came out NaN or infinite: the run fails rather than recording it."""


@dataclass
class Prepared:
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    calib: torch.Tensor  # (calib_size, seq_len); (0, seq_len) for a job that does not calibrate
    windows: data.EvalWindows  # (num_windows, seq_len) tokens and the positions eval.protocol scores
    eval_tokens: torch.Tensor  # the evaluation text's tokens (no special tokens): benchmark prompts are cut from it
    backend: Backend
    recorder: Recorder


def prepare(cfg: Config) -> Prepared:
    """Every cheap check, in the order a user would fix them; no MLflow run exists yet."""
    device = resolve_device(cfg.device)
    check_model(cfg.model)
    check_store(cfg.tracking)
    backend = get_backend(cfg.backend)
    support.preflight_check(cfg)  # engine x format x GPU (gb10exp/backends/support.py)
    export.preflight_check(cfg)
    check_tasks(cfg.eval)
    tokenizer = load_tokenizer(cfg.model)
    # An engine serving a model of its own compares its tokenizer with ours (speed-only runs: not needed).
    backend.check(cfg.qformat, tokenizer if cfg.eval.enabled else None)
    speed_only.check(cfg, backend)
    calib = data.calib_samples(
        data.tokenize(data.load_text("calib", cfg.calib), tokenizer), cfg.calib.seq_len, cfg.calib_size, cfg.seed
    ) if calibrates(cfg) else torch.zeros((0, cfg.calib.seq_len), dtype=torch.long)
    eval_tokens = data.tokenize(data.load_text("eval", cfg.eval), tokenizer)
    windows = data.eval_windows(eval_tokens, cfg.eval.seq_len, cfg.eval.num_windows, cfg.eval.protocol, tokenizer)
    return Prepared(device, resolve_dtype(cfg.model.dtype, device), tokenizer, calib, windows,
                    eval_tokens[: windows.tokens.numel()], backend, Recorder(cfg.tracking))


def run_name(cfg: Config) -> str:
    return cfg.tracking.run_name or f"{cfg.model.name}-{cfg.qformat.name}-calib{cfg.calib_size}-{cfg.backend.name}"


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    bad = {k: v for k, v in metrics.items() if v is not None and not math.isfinite(v)}
    if bad:
        raise NonFiniteMetric(f"non-finite metrics {bad}: the quantized model's outputs overflowed or are NaN")
    return metrics


class GpuOutOfMemory(RuntimeError):
    """CUDA ran out of memory; the message says which settings to lower."""


@contextlib.contextmanager
def oom_hint() -> Iterator[None]:
    """Turn CUDA's many-line out-of-memory error into one line with the fix (the traceback keeps the rest)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise GpuOutOfMemory(
            "out of GPU memory: lower eval.batch_size, calib.batch_size or bench.batch_size, or the sequence "
            f"lengths (eval.seq_len, calib.seq_len, bench.input_len) ({str(exc).splitlines()[0][:120]})"
        ) from exc


@restored_globals()  # seeds, default dtype...: the next job of the sweep starts from the same state
def run(cfg: Config, resolved: dict, overrides: list[str], sweep_tags: dict[str, str]) -> dict[str, Any]:
    """Run one job and return its results (the same dict that is logged as results.json)."""
    p = prepare(cfg)
    if not cfg.eval.enabled:  # speed only, of whatever the engine serves: nothing of ours is loaded
        return speed_only.run_speed_only(cfg, p, resolved, overrides, sweep_tags)
    quantizing = quantizes(cfg.qformat)
    # Resume matches the whole identity (config, hardware, dtype, code, versions, data digests): a run on
    # another machine or other code is a new run; calibration-free formats share one across calib settings.
    ident = run_identity(cfg, resolved, p.device, p.dtype, p.tokenizer, p.calib, p.windows)
    if not cfg.force and (done := p.recorder.find_finished(ident.key)):
        log.info("skipping %s: identical run %s already finished (run_identity %s; force=true reruns)",
                 run_name(cfg), done, ident.key)
        return {"skipped": True, "run_id": done.run_id}
    if not cfg.force and (live := p.recorder.find_running(ident.key)):  # e.g. the same sweep on another machine
        log.info("skipping %s: identical run %s is running now (force=true runs it anyway)", run_name(cfg), live)
        return {"skipped": True, "run_id": live.run_id}

    tags = environment(p.device) | sweep_tags | ident.tags | {
        "qformat": cfg.qformat.name, "model": cfg.model.name, "backend": cfg.backend.name,
        "support": support.tag(cfg.backend.name, cfg.qformat, support.arch_of(p.device))}
    with p.recorder.run(run_name(cfg), resolved, overrides, tags) as rec, oom_hint():
        rec.log_inputs(dataset_inputs(cfg, tags, p.calib, p.windows))
        timers: dict[str, float] = {}
        start = time.perf_counter()

        model = load_model(cfg.model, p.device, p.dtype)
        export.check_model(model, cfg)  # an export that cannot work fails before quantization
        timers["load_s"] = time.perf_counter() - start

        # The baseline keeps the unquantized weights for KL divergence and top-1 agreement, unless the
        # evaluation of this exact model on these windows is cached (gb10exp/quant/cache.py).
        eval_entry = cache.eval_entry(cfg, p.calib, p.windows, p.device, p.dtype)
        cached = cache.load_accuracy(eval_entry)
        baseline = copy.deepcopy(model) if quantizing and cfg.eval.compare_baseline and not cached else None
        t = time.perf_counter()
        model, quant_cache = cache.quantize_cached(model, cfg, p.calib, p.device, p.dtype)
        rec.set_tags({"quant_cache": quant_cache, "eval_cache": cache.state(eval_entry, cached)})
        timers["quantize_s"] = time.perf_counter() - t

        t = time.perf_counter()
        accuracy = cached or evaluate_accuracy(model, p.windows, cfg.eval.batch_size, p.device, baseline)
        cache.save_accuracy(eval_entry, accuracy)
        del baseline
        timers["evaluate_s"] = time.perf_counter() - t
        metrics = accuracy.metrics()
        if not quantizing and not cfg.qformat.gguf_type:  # the baseline compared with itself, by definition
            metrics |= {"kl_mean": 0.0, "top1_agreement": 1.0}
        metrics["weight_gib"] = deployed_weight_bytes(model, cfg.qformat) / 2**30
        if cfg.qformat.kind == "auto":  # per-layer formats: artifact layer_formats.json, achieved bits and bytes
            metrics |= auto.record(model, rec)
        _finite(metrics)

        if cfg.eval.tasks:
            t = time.perf_counter()
            metrics |= run_tasks(model, p.tokenizer, cfg.eval, p.device)
            timers["tasks_s"] = time.perf_counter() - t

        # The engine: its start-up (GGUF build, export, engine build) is timed apart from every speed figure,
        # then it scores evaluation windows itself (speed and accuracy from the same kernels), then the speed.
        t = time.perf_counter()
        inputs = BenchInputs(model, p.tokenizer, p.eval_tokens, p.device, quantizing, cfg.model, cfg.qformat,
                             metrics["weight_gib"] * 2**30, deployed_decode_bytes(model, cfg.qformat))
        try:
            rec.set_tags(p.backend.prepare(inputs))
            timers["startup_s"] = time.perf_counter() - t
            engine = engine_accuracy(p.backend, p.windows, accuracy, cfg)
            metrics |= _finite(engine.metrics)
            rec.set_tags(engine.tags)
            if cfg.bench.enabled:
                t = time.perf_counter()
                bench, bench_tags = p.backend.benchmark(inputs, cfg.bench)
                timers["benchmark_s"] = time.perf_counter() - t
                metrics |= _finite(bench)
                rec.set_tags(bench_tags)
        finally:
            p.backend.close()
        if cfg.export:  # last: the export packs the model's weights in place
            t = time.perf_counter()
            metrics |= export.record(model, p.tokenizer, cfg, overrides, rec) | {"export_s": time.perf_counter() - t}

        timers["total_s"] = time.perf_counter() - start
        metrics |= timers
        rec.log_metrics(metrics)
        rec.set_tags({"mlflow.note.content": run_note(cfg, metrics, tags)})
        results = {"run_id": rec.run_id, "name": run_name(cfg), "metrics": metrics,
                   "windows": engine.windows or accuracy.as_dict()["windows"], "tags": tags}
        rec.log_dict(results, "results.json")
    return results

