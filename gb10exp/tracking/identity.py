"""A run's identity: everything that can change its numbers, hashed into one ``run_identity`` tag.

Resume skips a job only when a FINISHED run with the same identity exists: another machine, compute dtype,
code, library versions or data make a new run. The parts, each also a tag the MLflow UI can filter on:
- ``config_hash``: the resolved config without tracking/force/cache, and without the calibration settings
  for formats that do not calibrate (``gb10exp.quant.formats.Format.calibrates``);
- ``hardware`` (GPU name and compute capability, or CPU model and threads) and ``compute_dtype``;
- ``code_version`` (git commit, "-dirty" when files under gb10exp/ or conf/ differ, untracked ones included)
  and ``code_digest`` (their contents, so two dirty states differ);
- versions of torch, transformers, nvidia-modelopt, the backend's engine, and lm-eval when tasks run;
- ``calib_digest``, ``eval_digest``, ``tokenizer_digest``: the token tensors and the tokenizer themselves,
  so an edited data file or another tokenizer cannot hide behind an unchanged config.
The quantized-model cache (gb10exp/quant/cache.py) keeps its own, finer key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from gb10exp import hardware
from gb10exp.config import Config
from gb10exp.data import EvalWindows
from gb10exp.tracking import config_hash, sha16
from gb10exp.tracking import environment as env

CALIB_KEYS = ("calib", "calib_size", "seed")  # read only by calibration (seed picks the calibration samples)
IDENTITY_PACKAGES = ("torch", "transformers", "nvidia-modelopt")
# EvalConfig fields that change neither which tokens are scored nor how (the tokens themselves are digested).
EVAL_NOT_SCORING = ("dataset", "path", "seq_len", "num_windows", "batch_size", "compare_baseline", "tasks",
                    "task_include_path", "task_limit", "enabled")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256[:16] of a tensor's dtype, shape and values: 4 windows of 64 tokens differ from 2 of 128."""
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256[:16] of the whole tokenizer (vocabulary, merges, normalizer, special tokens, BOS/EOS policy)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers serialize completely
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
             "add_bos": getattr(tokenizer, "add_bos_token", None),
             "add_eos": getattr(tokenizer, "add_eos_token", None)}
    return hashlib.sha256(body.encode() + sha16(extra).encode()).hexdigest()[:16]


def eval_digest(windows: EvalWindows, cfg: Config) -> str:
    """The scored evaluation tokens (tokens, scoring starts, protocol: ``EvalWindows.digest``) and every
    other evaluation setting that changes how they are scored."""
    scoring = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in EVAL_NOT_SCORING}
    return sha16({"windows": windows.digest(), "scoring": scoring})


@dataclass(frozen=True)
class RunIdentity:
    key: str  # the run_identity tag: resume matches on it
    tags: dict[str, str]  # every part, plus run_identity, config_hash and calibration


def run_identity(cfg: Config, resolved: dict, device: torch.device, dtype: torch.dtype, tokenizer: Any,
                 calib: torch.Tensor, windows: EvalWindows, engine_package: str | None = None,
                 no_calibration: str = "none") -> RunIdentity:
    """The identity of one job, from its resolved config and what ``runner.prepare`` produced. ``calib``
    is empty for a job that reads no calibration data (its calibration settings are then left out, and
    ``no_calibration`` says why); ``engine_package``: the package of the engine the backend embeds."""
    calibrating = calib.numel() > 0
    packages = [*IDENTITY_PACKAGES, *([engine_package] if engine_package else []), *(["lm-eval"] if cfg.eval.tasks else [])]
    parts = {
        "config_hash": config_hash({k: v for k, v in resolved.items() if calibrating or k not in CALIB_KEYS}),
        "hardware": hardware.describe(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "code_version": env.code_version(),
        "code_digest": env.code_digest(),
        "calib_digest": tensor_digest(calib) if calibrating else "none",
        "eval_digest": eval_digest(windows, cfg),
        "tokenizer_digest": tokenizer_digest(tokenizer),
    }
    versions = {p: env.version(p) for p in packages}
    key = sha16({"parts": parts, "versions": versions})
    calibration = f"{calib.shape[0]} samples of {calib.shape[1]} tokens" if calibrating else no_calibration
    tags = parts | {f"version.{p}": v for p, v in versions.items()} | {"run_identity": key, "calibration": calibration}
    return RunIdentity(key, tags)
