"""The cheap per-job checks that preflight (gb10exp/__main__.py ``JOB_CHECKS``) runs on every job of a
sweep before the first job starts. Each takes the typed Config and raises a one-line ConfigError that
names the key, the value, what is allowed and how to fix it. Results are cached per distinct setting,
so a 10-job sweep over formats loads its tokenizer and counts its text's tokens once.
"""

from __future__ import annotations

import functools
import logging

from gb10exp.config import Config, ConfigError, DataConfig, ModelConfig, TrackingConfig

log = logging.getLogger(__name__)


def check_device(cfg: Config) -> None:
    """``device=cuda`` (or cuda:N) on a machine without that GPU fails here, for every job of the sweep."""
    import torch

    from gb10exp.models import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={cfg.device!r} is not allowed: {torch.cuda.device_count()} CUDA GPU(s) are visible; "
            "use device=cuda:0 .. or device=auto"
        )


@functools.cache
def _check_model(model: _Frozen) -> None:
    from gb10exp.models import check_model

    check_model(model.obj)


def check_model(cfg: Config) -> None:
    _check_model(_frozen(cfg.model))


@functools.cache
def _check_store(tracking: _Frozen) -> None:
    from gb10exp.tracking import check_store

    check_store(tracking.obj)


def check_store(cfg: Config) -> None:
    _check_store(_frozen(cfg.tracking))


def check_backend(cfg: Config) -> None:
    """The backend is installed and serves the format, its batch-size limit, and the lm-eval tasks."""
    from gb10exp.backends import get_backend
    from gb10exp.evaluate.tasks import check_tasks

    backend = get_backend(cfg.backend)
    backend.check(cfg.qformat)
    limit = getattr(backend, "max_batch_size", None)
    if cfg.bench.enabled and limit is not None and cfg.bench.batch_size > limit:
        raise ConfigError(
            f"bench.batch_size={cfg.bench.batch_size} is not allowed with backend={cfg.backend.name}: "
            f"at most {limit}; lower bench.batch_size (or raise backend.options.max_batch_size where "
            "the backend has it)"
        )
    check_tasks(cfg.eval)


def check_context_length(cfg: Config) -> None:
    """No sequence longer than the model's context (its max_position_embeddings), unless the user asked
    for it with eval.allow_long_context=true: positions beyond it were never trained and the numbers
    mean little (RoPE models still compute them)."""

    limit = _context_length(_frozen(cfg.model))
    if limit is None:
        return
    lengths = {"eval.seq_len": cfg.eval.seq_len, "calib.seq_len": cfg.calib.seq_len}
    if cfg.bench.enabled:
        lengths["bench.input_len+bench.output_len"] = cfg.bench.input_len + cfg.bench.output_len
    for key, value in lengths.items():
        if value <= limit:
            continue
        message = f"{key}={value} is beyond the context of model {cfg.model.name!r} ({limit} tokens)"
        if cfg.eval.allow_long_context:
            log.warning("%s; running anyway (eval.allow_long_context=true)", message)
        else:
            raise ConfigError(f"{message}: lower it, or set eval.allow_long_context=true to run anyway")


@functools.cache
def _context_length(model: _Frozen) -> int | None:
    from gb10exp.models import context_length

    return context_length(model.obj)


@functools.cache
def _tokenizer(model: _Frozen):
    from gb10exp.models import load_tokenizer

    return load_tokenizer(model.obj)


@functools.cache
def _token_count(split: str, data_cfg: _Frozen, model: _Frozen) -> int:
    from gb10exp import data

    return int(data.tokenize(data.load_text(split, data_cfg.obj), _tokenizer(model)).numel())


def check_data(cfg: Config) -> None:
    """The calibration and evaluation texts hold enough tokens for the samples, windows and prompts asked for
    (a missing, empty or short eval.path / calib.path fails here)."""
    import torch

    from gb10exp import data
    from gb10exp.bench import prompts

    model = _frozen(cfg.model)
    calib = _token_count("calib", _frozen(cfg.calib), model)
    data.calib_samples(torch.zeros(calib, dtype=torch.long), cfg.calib.seq_len, cfg.calib_size, cfg.seed)
    evaluated = _token_count("eval", _frozen(cfg.eval), model)
    data.eval_windows(torch.zeros(evaluated, dtype=torch.long), cfg.eval.seq_len, cfg.eval.num_windows)
    if cfg.bench.enabled:  # prompts are cut from the evaluation windows
        prompts(
            range(cfg.eval.seq_len * cfg.eval.num_windows),
            cfg.bench.input_len,
            cfg.bench.warmup + cfg.bench.repeats,
        )


class _Frozen:
    """A cache key for a config dataclass (dataclasses with list fields are not hashable): equal reprs,
    equal settings."""

    def __init__(self, obj: ModelConfig | DataConfig | TrackingConfig):
        self.obj, self.key = obj, repr(obj)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Frozen) and self.key == other.key


def _frozen(obj: ModelConfig | DataConfig | TrackingConfig) -> _Frozen:
    return _Frozen(obj)
