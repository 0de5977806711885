"""A run's identity: everything that can change its numbers, hashed into one ``run_identity`` tag.

Resume skips a job only when a FINISHED run with the same identity exists, so a run on another machine,
another compute dtype, other code, other library versions or other data is a new run. The parts:

- ``config_hash``: the resolved config without tracking/force/cache, and without the calibration
  settings for formats that do not calibrate (see ``calibrates``);
- ``hardware`` (GPU name and compute capability, or CPU model and threads) and ``compute_dtype``;
- ``code_version`` (git commit, "-dirty" when files under gb10exp/ or conf/ differ, untracked ones
  included) and ``code_digest`` (their contents, so two dirty states differ);
- versions of torch, transformers, nvidia-modelopt, the backend's engine, and lm-eval when tasks run;
- ``calib_digest``, ``eval_digest``, ``tokenizer_digest``: the token tensors and the tokenizer themselves,
  so an edited data file or another tokenizer cannot hide behind an unchanged config.

Every part is also a tag, so the MLflow UI can filter on it (``tags.hardware = '...'``). The quantized-model
cache (gb10exp/quant/cache.py) keeps its own, finer key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from gb10exp.config import Config, ConfigError
from gb10exp.data import EvalWindows
from gb10exp.tracking import config_hash
from gb10exp.tracking import environment as env

CALIB_KEYS = ("calib", "calib_size", "seed")  # read only by calibration (seed picks the calibration samples)
IDENTITY_PACKAGES = ("torch", "transformers", "nvidia-modelopt")
ENGINE_PACKAGES = {"llamacpp": "llama-cpp-python", "trtllm": "tensorrt-llm"}  # backends that embed an engine
# EvalConfig fields that change neither which tokens are scored nor how (the tokens themselves are digested).
EVAL_NOT_SCORING = (
    "dataset",
    "path",
    "seq_len",
    "num_windows",
    "batch_size",
    "compare_baseline",
    "tasks",
    "task_include_path",
    "task_limit",
    "enabled",
)
# Quantizers that see activations, in a Llama block; a format that enables any of them needs data.
_ACTIVATION_PROBES = (
    "model.layers.0.self_attn.q_proj.input_quantizer",
    "model.layers.0.self_attn.o_proj.output_quantizer",
    "model.layers.0.self_attn.k_bmm_quantizer",
    "model.layers.0.self_attn.v_bmm_quantizer",
    "model.layers.0.mlp.down_proj.input_quantizer",
)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> str:
    """sha256[:16] of a tensor's dtype, shape and values: 4 windows of 64 tokens differ from 2 of 128."""
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256[:16] of the whole tokenizer (vocabulary, merges, normalizer, special tokens, BOS/EOS policy)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers serialize completely
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {
        "class": type(tokenizer).__name__,
        "special": tokenizer.special_tokens_map,
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    return hashlib.sha256(body.encode() + _sha(extra).encode()).hexdigest()[:16]


def eval_digest(windows: EvalWindows, cfg: Config) -> str:
    """The scored evaluation tokens (tokens, scoring starts, protocol: ``EvalWindows.digest``) and every
    other evaluation setting that changes how they are scored."""
    scoring = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in EVAL_NOT_SCORING}
    return _sha({"windows": windows.digest(), "scoring": scoring})


def calibrates(cfg: Config) -> bool:
    """Whether the job runs calibration data through the model. Not for bf16 and GGUF formats (nothing
    for modelopt to quantize), nor for ``uses_calibration: false`` formats (weight-only round-to-nearest:
    modelopt's max calibration reads the weights directly), unless KV-cache quantization needs activations."""
    from gb10exp.quant import quantizes

    return quantizes(cfg.qformat) and (
        cfg.qformat.uses_calibration or cfg.kv_cache_qformat != "none"
    )


def calibration_need(modelopt_cfg: dict) -> str | None:
    """Why a modelopt config needs calibration data, or None when its result cannot depend on it (max
    calibration of weight quantizers only: ``mtq.calibrate`` sets their amax from the weights alone)."""
    from modelopt.torch.quantization.config import normalize_quant_cfg_list

    algorithm = modelopt_cfg.get("algorithm", "max")
    method = algorithm.get("method") if isinstance(algorithm, dict) else algorithm
    if method not in ("max", None):
        return f"its algorithm {method!r} reads activations"
    enabled = dict.fromkeys(_ACTIVATION_PROBES, True)  # modelopt enables a quantizer no entry disables
    for entry in normalize_quant_cfg_list(modelopt_cfg["quant_cfg"]):
        if entry.get("parent_class") not in (None, "nn.Linear"):
            continue
        for probe in enabled:
            if fnmatch.fnmatch(probe, entry["quantizer_name"]):
                enabled[probe] = entry["enable"]
    on = [p.rsplit(".", 1)[1] for p, e in enabled.items() if e]
    return f"it enables activation quantizers ({', '.join(sorted(set(on)))})" if on else None


def check_calibration_flag(cfg: Config) -> None:
    """A format that declares ``uses_calibration: false`` must really be calibration-free, or skipping the
    forward pass would change its numbers. Imports modelopt: call it in the job (or preflight per job)."""
    q = cfg.qformat
    if q.uses_calibration or q.modelopt_cfg is None:
        return
    from gb10exp.quant import modelopt_config

    if reason := calibration_need(modelopt_config(q)):
        raise ConfigError(
            f"qformat.uses_calibration=False is not allowed for qformat={q.name!r}: {q.modelopt_cfg} "
            f"needs calibration data ({reason}); set uses_calibration: true in conf/qformat/{q.name}.yaml"
        )


preflight_check = check_calibration_flag  # the per-job check preflight may call (CONTRACT)


def _is_nvfp4(cfg: Config) -> bool:
    """Whether any quantizer of the job is NVFP4 (FP4 E2M1 values with FP8 E4M3 block scales)."""
    from gb10exp.quant import load_qformat, modelopt_config

    if cfg.qformat.kind == "auto":  # a per-layer mix: NVFP4 when any candidate is
        return any(_is_nvfp4(dataclasses.replace(cfg, qformat=load_qformat(f))) for f in cfg.qformat.auto.formats)
    mcfg = modelopt_config(cfg.qformat, cfg.kv_cache_qformat)
    if mcfg is None:
        return False
    for entry in mcfg["quant_cfg"]:
        for attrs in entry.get("cfg") if isinstance(entry.get("cfg"), list) else [entry.get("cfg") or {}]:
            scale_bits = (attrs.get("block_sizes") or {}).get("scale_bits")
            if attrs.get("num_bits") in ((2, 1), [2, 1]) and scale_bits in ((4, 3), [4, 3]):
                return True
    return False


def _engine_native(cfg: Config, device: torch.device) -> bool:
    """Whether the backend runs this format with the engine's real quantized kernels on this device."""
    from gb10exp.backends import support

    return support.lookup(cfg.backend.name, cfg.qformat, support.arch_of(device)).status == "native"


def quantization_tags(cfg: Config, device: torch.device) -> dict[str, str]:
    """``quantization``: what computed the numbers. ``nvfp4`` (NVFP4 formats only): "simulated" whenever
    modelopt's fake quantization computed them (the hf backend always), "native" only when an engine ran
    real FP4 kernels, which exist from Blackwell on."""
    q = cfg.qformat
    if q.gguf_type is not None:
        return {"quantization": f"by the engine ({q.gguf_type})"}
    if q.kind == "none":
        return {"quantization": "none"}
    native = _engine_native(cfg, device)
    tags = {
        "quantization": f"native ({cfg.backend.name} kernels) for speed and engine_perplexity; simulated "
        "(modelopt fake quantization) for perplexity, KL and top-1"
        if native
        else "simulated (modelopt fake quantization)"
    }
    if _is_nvfp4(cfg):
        tags["nvfp4"] = "native" if native and env.fp4_tensor_cores(device) else "simulated"
    return tags


@dataclass(frozen=True)
class RunIdentity:
    key: str  # the run_identity tag: resume matches on it
    tags: dict[str, str]  # every part, plus run_identity, config_hash, calibration and quantization tags


def run_identity(
    cfg: Config,
    resolved: dict,
    device: torch.device,
    dtype: torch.dtype,
    tokenizer: Any,
    calib: torch.Tensor,
    windows: EvalWindows,
) -> RunIdentity:
    """The identity of one job, from its resolved config and what ``runner.prepare`` produced."""
    check_calibration_flag(cfg)
    calibrating = calibrates(cfg)
    engine = ENGINE_PACKAGES.get(cfg.backend.name)
    packages = [*IDENTITY_PACKAGES, *([engine] if engine else []), *(["lm-eval"] if cfg.eval.tasks else [])]
    parts = {
        "config_hash": config_hash({k: v for k, v in resolved.items() if calibrating or k not in CALIB_KEYS}),
        "hardware": env.hardware(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "code_version": env.code_version(),
        "code_digest": env.code_digest(),
        "calib_digest": tensor_digest(calib) if calibrating else "none",
        "eval_digest": eval_digest(windows, cfg),
        "tokenizer_digest": tokenizer_digest(tokenizer),
    }
    versions = {p: env.version(p) for p in packages}
    key = _sha({"parts": parts, "versions": versions})
    calibration = (
        f"{calib.shape[0]} samples of {calib.shape[1]} tokens"
        if calibrating
        else "none"
        if cfg.qformat.kind == "none"
        else "skipped: weight-only round-to-nearest, max calibration reads the weights alone"
    )
    tags = (
        parts
        | {f"version.{p}": v for p, v in versions.items()}
        | {"run_identity": key, "calibration": calibration}
    )
    return RunIdentity(key, tags | quantization_tags(cfg, device))
