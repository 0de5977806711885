"""The recipe of one job: prepare, then load, quantize, evaluate, engine, export, record.

``prepare`` runs the job's checks (``gb10exp.preflight.check_job``) and everything cheap (tokenizer, data,
identity) before an MLflow run exists, so bad input costs seconds and leaves no record. From
``Recorder.run`` on, any exception marks the run FAILED with its traceback. A speed-only job
(``eval.enabled=false``: an engine serving a model of its own) is the same recipe with the steps that
need our model skipped.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gb10exp import backends as backends_
from gb10exp import data, hardware, preflight
from gb10exp.backends import Backend, BenchInputs, support
from gb10exp.config import Config
from gb10exp.evaluate import AccuracyResult, evaluate_accuracy
from gb10exp.evaluate import cache as eval_cache
from gb10exp.evaluate.engine import engine_accuracy
from gb10exp.evaluate.tasks import run_tasks
from gb10exp.isolation import restored_globals
from gb10exp.models import load_model, load_tokenizer, resolve_dtype
from gb10exp.models.offload import Offloaded, ReadCounter, load_offloaded
from gb10exp.quant import Unquantized, auto, export, formats
from gb10exp.quant import bytes as qbytes
from gb10exp.quant import cache as quant_cache
from gb10exp.quant.nvfp4_cpu import cpu_nvfp4
from gb10exp.tracking import Recorder
from gb10exp.tracking.environment import environment
from gb10exp.tracking.identity import RunIdentity, run_identity
from gb10exp.tracking.ui import dataset_inputs, run_note

log = logging.getLogger(__name__)


class NonFiniteMetric(RuntimeError):
    """A metric came out NaN or infinite: the run fails rather than recording it."""


class GpuOutOfMemory(RuntimeError):
    """CUDA ran out of memory; the message says which settings to lower."""


@dataclass
class Job:
    """One job, prepared: its config and format, where it runs, its data, its engine and its record."""

    cfg: Config
    fmt: formats.Format
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    calib: torch.Tensor  # (calib_size, seq_len); (0, seq_len) for a job that does not calibrate
    windows: data.EvalWindows  # (num_windows, seq_len) tokens and the positions eval.protocol scores
    eval_tokens: torch.Tensor  # the evaluation text's tokens (no special tokens): benchmark prompts are cut from it
    backend: Backend
    identity: RunIdentity
    recorder: Recorder
    tags: dict[str, str] = field(default_factory=dict)  # the run's tags, set when it starts
    metrics: dict[str, float] = field(default_factory=dict)
    windows_sums: dict | None = None  # results.json's per-window sums
    deployed_sums: dict | None = None  # the engine's own per-window sums beside a simulated headline
    model_key: str | None = None  # the quantized model's content key (quant cache): engines cache builds by it
    baseline: torch.nn.Module | None = None  # the unquantized model, kept for KL and top-1 agreement
    cached: AccuracyResult | None = None  # this exact evaluation, from the eval cache
    eval_entry: Path | None = None  # its folder in the eval cache (None with cache=false)
    deployed: qbytes.Tensors | None = None  # the format's deployed tensors (the byte rule's input)
    offload: Offloaded | None = None  # quant.offload_dir: what stays on disk
    reads: ReadCounter | None = None  # bytes read back from the offload folder

    @property
    def speed_only(self) -> bool:
        return not self.cfg.eval.enabled

    @property
    def name(self) -> str:
        if self.cfg.tracking.run_name:
            return self.cfg.tracking.run_name
        if self.speed_only:
            return f"{self.backend.served_model}-speed-{self.cfg.backend.name}"
        cfg = self.cfg  # every setting that tells two runs of a sweep apart, and nothing that does not
        kv = f"-kv{cfg.kv_cache_qformat}" if cfg.kv_cache_qformat != "none" else ""
        calib = f"-calib{cfg.calib_size}" + (f"-seed{cfg.seed}" if cfg.seed else "") if self.fmt.calibrates else ""
        return f"{cfg.model.name}-{cfg.qformat.name}{kv}{calib}-{cfg.backend.name}"

    @contextlib.contextmanager
    def timed(self, key: str, memory: bool = True) -> Iterator[None]:
        """Time the block into metric ``key`` (seconds); with ``memory``, also its peak resident memory
        (``mem_rss_peak_<phase>_gib``, on a GPU ``mem_gpu_peak_<phase>_gib``) and the job's peak so far
        (``mem_rss_peak_gib``, ``mem_gpu_peak_gib``) and, with ``quant.offload_dir``, the bytes it read back from
        the offload folder (``offload_read_<phase>_gib``). Phases must not nest: each starts a new peak."""
        if memory:
            hardware.reset_peak_memory(self.device)
        read = self.reads.bytes if self.reads else 0
        start = time.perf_counter()
        yield
        self.metrics[key] = time.perf_counter() - start
        if memory:
            phase = key.removesuffix("_s")
            if self.reads:
                self.metrics[f"offload_read_{phase}_gib"] = (self.reads.bytes - read) / 2**30
            for kind, peak in hardware.peak_memory(self.device).items():
                self.metrics[f"mem_{kind}_peak_{phase}_gib"] = peak / 2**30
                self.metrics[f"mem_{kind}_peak_gib"] = max(self.metrics.get(f"mem_{kind}_peak_gib", 0.0), peak / 2**30)

    def run_tags(self, sweep_tags: dict[str, str]) -> dict[str, str]:
        cfg, arch = self.cfg, hardware.arch(self.device)
        model = {"model": str(self.backend.served_model), "served_model": str(self.backend.served_model),
                 "accuracy": "none: eval.enabled=false (speed only)"} if self.speed_only else {"model": cfg.model.name}
        self.tags = (environment(self.device) | sweep_tags | self.identity.tags | self.fmt.tags() | model
                     | support.quantization_tags(cfg.backend.name, self.fmt, self.device)
                     | {"qformat": cfg.qformat.name, "backend": cfg.backend.name,
                        "support": support.tag(cfg.backend.name, self.fmt, arch)})
        return self.tags


def prepare(cfg: Config, resolved: dict | None = None) -> Job:
    """Every check and everything cheap, in the order a user would fix them; no MLflow run exists yet.
    ``resolved``: the resolved config as a dict (part of the run's identity)."""
    preflight.check_job(cfg)
    device = hardware.resolve(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    fmt = formats.of(cfg.qformat, cfg.kv_cache_qformat)
    tokenizer = load_tokenizer(cfg.model)
    backend = backends_.checked(cfg)
    calib = data.calib_samples(
        data.tokenize(data.load_text("calib", cfg.calib), tokenizer), cfg.calib.seq_len, cfg.calib_size, cfg.seed
    ) if fmt.calibrates else torch.zeros((0, cfg.calib.seq_len), dtype=torch.long)
    eval_tokens = data.tokenize(data.load_text("eval", cfg.eval), tokenizer)
    windows = data.eval_windows(eval_tokens, cfg.eval.seq_len, cfg.eval.num_windows, cfg.eval.protocol, tokenizer)
    identity = run_identity(cfg, resolved or {}, device, dtype, tokenizer, calib, windows, backend.engine_package,
                            fmt.calibration_skipped)
    return Job(cfg, fmt, device, dtype, tokenizer, calib, windows, eval_tokens[: windows.tokens.numel()], backend,
               identity, Recorder(cfg.tracking))


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    bad = {k: v for k, v in metrics.items() if v is not None and not math.isfinite(v)}
    if bad:
        raise NonFiniteMetric(f"non-finite metrics {bad}: the quantized model's outputs overflowed or are NaN")
    return metrics


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
    job = prepare(cfg, resolved)
    if (skipped := already_done(job)) is not None:
        return skipped
    # Only a job modelopt quantizes has NVFP4 quantizers to reroute (and needs modelopt imported: seconds).
    nvfp4_ops = cpu_nvfp4() if job.fmt.modelopt else contextlib.nullcontext()
    with job.recorder.run(job.name, resolved, overrides, job.run_tags(sweep_tags)) as rec, oom_hint(), nvfp4_ops:
        rec.log_inputs(dataset_inputs(cfg, job.identity.tags, job.calib, job.windows))
        with job.timed("total_s", memory=False):
            model = load(job)
            model = quantize(job, model, rec)
            accuracy = evaluate(job, model)
            engine(job, model, accuracy, rec)
            if cfg.export:  # last: the export packs the model's weights in place
                with job.timed("export_s"):
                    job.metrics |= export.record(model, job.tokenizer, cfg, overrides, rec)
        return record(job, rec)


def already_done(job: Job) -> dict[str, Any] | None:
    """Resume: a FINISHED run with the same identity (config, hardware, dtype, code, versions, data digests)
    is this job already done; a live RUNNING one (another process or machine) is it being done."""
    if job.cfg.force:
        return None
    for found, state in ((job.recorder.find_finished(job.identity.key), "already finished"),
                         (job.recorder.find_running(job.identity.key), "is running now")):
        if found is not None:
            log.info("skipping %s: identical run %s %s (run_identity %s; force=true reruns)", job.name, found,
                     state, job.identity.key)
            return {"skipped": True, "run_id": found.run_id}
    return None


def load(job: Job) -> torch.nn.Module | None:
    """The model on its device; None for a speed-only job (nothing of ours is loaded)."""
    if job.speed_only:
        return None
    with job.timed("load_s"):
        if job.cfg.quant.offload_dir:
            model, job.offload = load_offloaded(job.cfg.model, job.device, job.dtype, job.cfg.quant.offload_dir)
            job.reads = ReadCounter(model)
            job.recorder.set_tags({"offload.folder": str(job.offload.folder), "offload.layers": job.offload.layers})
        else:
            model = load_model(job.cfg.model, job.device, job.dtype)
        export.check_model(model, job.cfg)  # an export that cannot work fails before quantization
    return model


def quantize(job: Job, model: torch.nn.Module | None, rec: Recorder) -> torch.nn.Module | None:
    """The format, through the quantized-model cache. The unquantized weights are kept for KL divergence and
    top-1 agreement, unless the evaluation of this exact model on these windows is cached."""
    if model is None:
        return None
    cfg = job.cfg
    # The quantized model's key, computed once: the quant cache, the eval cache and the engines' builds use it.
    job.model_key = quant_cache.quant_key(cfg, job.calib, job.device, job.dtype)
    job.eval_entry = eval_cache.entry(cfg, job.model_key, job.windows)
    job.cached = eval_cache.load(job.eval_entry)
    if job.fmt.modelopt and cfg.eval.compare_baseline and not job.cached:
        # An offloaded model has no room for a copy: the same model with its quantizers off is the reference
        # (exact for the scale-only algorithms quant.layerwise allows).
        job.baseline = Unquantized(model) if job.offload else copy.deepcopy(model)
    with job.timed("quantize_s"):
        model, state = quant_cache.quantize_cached(model, cfg, job.calib, job.device, job.model_key,
                                                   offloaded=job.offload is not None)
    rec.set_tags({"quant_cache": state, "eval_cache": eval_cache.state(job.eval_entry, job.cached)})
    job.deployed = qbytes.from_module(model, job.fmt, kv_cache_qformat=cfg.kv_cache_qformat)
    return model


def evaluate(job: Job, model: torch.nn.Module | None) -> AccuracyResult | None:
    """Perplexity, KL and top-1 on the job's windows, the deployed bytes, and the lm-eval tasks."""
    if model is None:
        return None
    cfg = job.cfg
    with job.timed("evaluate_s"):
        accuracy = job.cached or evaluate_accuracy(model, job.windows, cfg.eval.batch_size, job.device, job.baseline)
        eval_cache.save(job.eval_entry, accuracy)
    job.baseline = None  # its memory, back before the engine starts
    metrics = accuracy.metrics()
    if not job.fmt.quantized:  # the baseline compared with itself, by definition
        metrics |= {"kl_mean": 0.0, "top1_agreement": 1.0}
    metrics |= {"weight_gib": job.deployed.weight_bytes / 2**30,
                "decode_gib": qbytes.decode_step_bytes(job.deployed) / 2**30}
    if job.fmt.kind == "auto":  # per-layer formats: artifact layer_formats.json, achieved bits
        metrics |= auto.record(model, job.recorder)
    job.metrics |= _finite(metrics)
    job.windows_sums = accuracy.as_dict()["windows"]
    if cfg.eval.tasks:
        with job.timed("tasks_s"):
            job.metrics |= run_tasks(model, job.tokenizer, cfg.eval, job.device)
    return accuracy


def engine(job: Job, model: torch.nn.Module | None, accuracy: AccuracyResult | None, rec: Recorder) -> None:
    """The engine: its start-up (GGUF build, export, engine build) timed apart from every speed figure, then
    it scores evaluation windows itself (speed and accuracy from the same kernels), then the speed. The
    engine is always closed."""
    cfg = job.cfg
    inputs = BenchInputs(model, job.tokenizer, job.eval_tokens, job.device, job.fmt, cfg.model, job.deployed,
                         job.model_key)
    try:
        with job.timed("startup_s"):
            rec.set_tags(job.backend.prepare(inputs))
        if accuracy is not None:
            # The unquantized reference of the engine's figures: the model itself unless modelopt changed it.
            reference = lambda: load_model(cfg.model, job.device, job.dtype) if job.fmt.modelopt else model  # noqa: E731
            with job.timed("engine_accuracy_s"):
                scored = engine_accuracy(job.backend, job.windows, accuracy, cfg, job.fmt, job.device, reference)
            job.metrics |= _finite(scored.metrics)
            rec.set_tags(scored.tags | job.backend.describe())
            job.windows_sums = scored.windows or job.windows_sums
            job.deployed_sums = scored.deployed
        if cfg.bench.enabled:
            with job.timed("benchmark_s"):
                bench, bench_tags = job.backend.benchmark(inputs, cfg.bench)
            job.metrics |= _finite(bench)
            rec.set_tags(bench_tags)
    finally:
        job.backend.close()


def record(job: Job, rec: Recorder) -> dict[str, Any]:
    """The run's metrics, its one-line description and results.json."""
    if job.offload is not None:
        job.metrics |= {"offload_gib": job.offload.disk_bytes / 2**30,
                        "offload_resident_gib": job.offload.resident_bytes / 2**30,
                        "offload_read_gib": job.reads.bytes / 2**30}
    rec.log_metrics(job.metrics)
    if not job.speed_only:
        rec.set_tags({"mlflow.note.content": run_note(job.cfg, job.metrics, job.tags)})
    results = {"run_id": rec.run_id, "name": job.name, "metrics": job.metrics, "windows": job.windows_sums,
               "tags": job.tags} | ({"windows_deployed": job.deployed_sums} if job.deployed_sums else {})
    rec.log_dict(results, "results.json")
    return results
