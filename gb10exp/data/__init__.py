"""Calibration and evaluation text.

Each dataset is a function ``(split, cfg) -> str`` in ``DATASETS``; ``split`` is "calib" or "eval" and
the two parts of one dataset never overlap. Text is tokenized once, then cut into fixed windows:
evaluation takes the first ``num_windows`` windows (identical for every format of a model), calibration
draws ``calib_size`` windows with a seeded generator (identical for every format too).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from gb10exp.config import ConfigError, DataConfig


def _pydoc_topics(split: str, cfg: DataConfig) -> str:
    # CPython's own reference docs: ~465k characters shipped with every Python, so the default needs no
    # network. Topics in sorted key order; every 4th topic is evaluation text, the rest calibration.
    from pydoc_data.topics import topics

    keys = sorted(topics)
    chosen = [k for i, k in enumerate(keys) if (i % 4 == 3) == (split == "eval")]
    return "\n\n".join(topics[k] for k in chosen)


def _hf_dataset(name: str, subset: str, split: str, column: str, key: str) -> str:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # the hub raises many types: offline, missing cache, auth
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{key}.dataset could not load {name}/{subset} ({split}) offline or from the cache ({first}); "
            f"use {key}=pydoc_topics or {key}=text_file {key}.path=FILE"
        ) from exc
    return "\n\n".join(t for t in ds[column] if t.strip())


def _wikitext2(split: str, cfg: DataConfig) -> str:
    return _hf_dataset("wikitext", "wikitext-2-raw-v1", "train" if split == "calib" else "test", "text", split)


def _cnn_dailymail(split: str, cfg: DataConfig) -> str:
    return _hf_dataset("cnn_dailymail", "3.0.0", "train" if split == "calib" else "test", "article", split)


def _text_file(split: str, cfg: DataConfig) -> str:
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{split}.path={cfg.path!r} is not allowed: no such file; give an existing UTF-8 text file")
    lines = path.read_text(encoding="utf-8").splitlines()
    cut = (len(lines) * 3) // 4  # first 3/4 of the lines calibrate, the last 1/4 evaluates
    return "\n".join(lines[:cut] if split == "calib" else lines[cut:])


DATASETS: dict[str, Callable[[str, DataConfig], str]] = {
    "pydoc_topics": _pydoc_topics,
    "wikitext2": _wikitext2,
    "cnn_dailymail": _cnn_dailymail,
    "text_file": _text_file,
}


def load_text(split: str, cfg: DataConfig) -> str:
    """The raw text of one split; raises ConfigError (one line) when it cannot be had."""
    return DATASETS[cfg.dataset](split, cfg)


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """All tokens of ``text`` as one 1-D tensor (no special tokens: windows are cut from running text)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokens: torch.Tensor, seq_len: int, num_windows: int) -> torch.Tensor:
    """The first ``num_windows`` non-overlapping windows, shape (num_windows, seq_len)."""
    available = tokens.numel() // seq_len
    if available < num_windows:
        raise ConfigError(
            f"eval.num_windows={num_windows} is not allowed: the evaluation text holds only {available} "
            f"windows of {seq_len} tokens; lower eval.num_windows or eval.seq_len"
        )
    return tokens[: num_windows * seq_len].view(num_windows, seq_len)


def calib_samples(tokens: torch.Tensor, seq_len: int, calib_size: int, seed: int) -> torch.Tensor:
    """``calib_size`` distinct windows drawn with a seeded generator, shape (calib_size, seq_len)."""
    available = tokens.numel() // seq_len
    if available < calib_size:
        raise ConfigError(
            f"calib_size={calib_size} is not allowed: the calibration text holds only {available} samples "
            f"of {seq_len} tokens; lower calib_size or calib.seq_len, or use a larger calib dataset"
        )
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(available, generator=generator)[:calib_size].sort().values
    return tokens[: available * seq_len].view(available, seq_len)[picks]
