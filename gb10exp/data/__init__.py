"""Calibration and evaluation text: each dataset a function ``(split, cfg) -> str`` in ``DATASETS``, whose
"calib" and "eval" splits never overlap. Text is tokenized once and cut into windows: evaluation takes the
first ``num_windows``, cut and scored as ``eval.protocol`` says (``eval_windows``); calibration draws
``calib_size`` with a seeded generator. Both are identical for every format of a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gb10exp.config import Config, ConfigError, DataConfig
from gb10exp.models import load_tokenizer


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
        raise ConfigError(f"{key}.dataset could not load {name}/{subset} ({split}) offline or from the cache "
                          f"({first}); use {key}=pydoc_topics or {key}=text_file {key}.path=FILE") from exc
    return "\n\n".join(t for t in ds[column] if t.strip())


def _wikitext2(split: str, cfg: DataConfig) -> str:
    return _hf_dataset("wikitext", "wikitext-2-raw-v1", "train" if split == "calib" else "test", "text", split)


def _cnn_dailymail(split: str, cfg: DataConfig) -> str:
    return _hf_dataset("cnn_dailymail", "3.0.0", "train" if split == "calib" else "test", "article", split)


def _text_file(split: str, cfg: DataConfig) -> str:
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{split}.path={cfg.path!r} is not allowed: no such file; give an existing UTF-8 text file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{split}.path={cfg.path!r} is not allowed: not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                          f"at offset {exc.start}); give a text file") from None
    cut = (len(lines) * 3) // 4  # first 3/4 of the lines calibrate, the last 1/4 evaluates
    return "\n".join(lines[:cut] if split == "calib" else lines[cut:])


DATASETS: dict[str, Callable[[str, DataConfig], str]] = {
    "pydoc_topics": _pydoc_topics, "wikitext2": _wikitext2, "cnn_dailymail": _cnn_dailymail,
    "text_file": _text_file}


def load_text(split: str, cfg: DataConfig) -> str:
    """The raw text of one split; raises ConfigError (one line) when it cannot be had."""
    return DATASETS[cfg.dataset](split, cfg)


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """All tokens of ``text`` as one 1-D tensor (no special tokens: windows are cut from running text)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_to_add(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one before text it encodes (add_special_tokens), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    return bos if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None


def prefix_token(tokenizer) -> int:
    """lm-eval's ``prefix_token_id`` for rolling log-likelihood: BOS when the tokenizer has one (added or
    not), else EOS; the first token of the text is predicted from it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else tokenizer.eos_token_id


@dataclass(frozen=True)
class EvalWindows:
    """Evaluation windows ``tokens`` (N, T): the logits at position p predict ``tokens[:, p + 1]``, and the
    targets of window i from ``score_from[i]`` on (1 <= score_from[i] <= T - 1) are scored. Perplexity, KL,
    top-1 agreement, the reference's NLL and every engine's perplexity cover exactly these targets."""

    tokens: torch.Tensor  # (N, T) long
    score_from: torch.Tensor  # (N,) long
    protocol: str = "windows"

    def __post_init__(self) -> None:
        n, t = self.tokens.shape
        if self.score_from.shape != (n,) or not bool(((self.score_from >= 1) & (self.score_from < t)).all()):
            raise ValueError(f"score_from must hold one index in [1, {t - 1}] per window, got {self.score_from}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: slice) -> EvalWindows:
        return EvalWindows(self.tokens[index], self.score_from[index], self.protocol)

    @property
    def scored(self) -> list[int]:  # scored tokens per window
        return (self.tokens.shape[1] - self.score_from).tolist()

    def digest(self) -> str:
        """sha256 of the tokens, the scoring starts and the protocol: equal digests, equal scored data."""
        h = hashlib.sha256(self.protocol.encode())
        for t in (self.tokens, self.score_from):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.to(torch.long).contiguous().cpu().numpy().tobytes())
        return h.hexdigest()


def _head(stream: torch.Tensor, per_window: int, num_windows: int, seq_len: int,
          protocol: str) -> torch.Tensor:
    """The first ``num_windows`` x ``per_window`` tokens of ``stream``; a one-line error if it is shorter."""
    available = stream.numel() // per_window
    if available < num_windows:
        raise ConfigError(f"eval.num_windows={num_windows} is not allowed: the evaluation text holds only "
                          f"{available} windows of {seq_len} tokens (eval.protocol={protocol}); lower "
                          "eval.num_windows or eval.seq_len")
    return stream[: num_windows * per_window]


def eval_windows(tokens: torch.Tensor, seq_len: int, num_windows: int, protocol: str = "windows",
                 tokenizer=None) -> EvalWindows:
    """``num_windows`` windows of ``seq_len`` tokens from the start of the text, cut as ``protocol`` says.

    ``tokens``: the text without special tokens (``tokenize``); ``tokenizer``: its BOS/prefix token (llamacpp
    and rolling).
    - ``windows``: non-overlapping windows of the text, every target scored (T - 1 per window), no BOS.
    - ``llamacpp``: llama.cpp's perplexity tool (tools/perplexity/perplexity.cpp, ``perplexity()``): the
      text tokenized with special tokens (BOS first when the tokenizer adds one) is cut into
      non-overlapping chunks of n_ctx = T; each chunk's first token is replaced by BOS when the tokenizer
      adds one; only the targets after the first half are scored (first = T // 2: T - T // 2 - 1 tokens).
    - ``rolling``: lm-eval's ``loglikelihood_rolling`` (``get_rolling_token_windows`` with context_len=1,
      then ``make_disjoint_window``) with max_length = T - 1: the text tokenized with special tokens,
      prefixed by ``prefix_token``, every token predicted exactly once; window k > 0 starts one token
      before the first token it predicts, so each window holds T - 1 predictions and T tokens.
    """
    if protocol == "windows":
        windows = _head(tokens, seq_len, num_windows, seq_len, protocol).view(num_windows, seq_len)
        return EvalWindows(windows, torch.ones(num_windows, dtype=torch.long), protocol)
    if tokenizer is None:
        raise ValueError(f"eval.protocol={protocol} needs the tokenizer (its BOS / prefix token)")
    bos = bos_to_add(tokenizer)
    stream = tokens if bos is None else torch.cat([torch.tensor([bos]), tokens])
    if protocol == "llamacpp":
        if seq_len < 4:
            raise ConfigError(f"eval.seq_len={seq_len} is not allowed with eval.protocol=llamacpp: at least 4 "
                              "tokens (the second half of each window is scored)")
        windows = _head(stream, seq_len, num_windows, seq_len, protocol).view(num_windows, seq_len).clone()
        if bos is not None:
            windows[:, 0] = bos
        return EvalWindows(windows, torch.full((num_windows,), seq_len // 2 + 1, dtype=torch.long), protocol)
    if protocol == "rolling":
        if seq_len < 2:
            raise ConfigError(f"eval.seq_len={seq_len} is not allowed with eval.protocol=rolling: at least 2 tokens")
        cut = _head(stream, seq_len - 1, num_windows, seq_len, protocol)
        return rolling_windows(cut.tolist(), prefix_token(tokenizer), seq_len)
    raise ConfigError(f"eval.protocol={protocol!r} is not allowed: one of ['windows', 'llamacpp', 'rolling']")


def rolling_windows(token_list: list[int], prefix: int, seq_len: int) -> EvalWindows:
    """Every token of ``token_list`` predicted exactly once, as lm-eval's rolling log-likelihood does with
    max_length = seq_len - 1: the first window is ``[prefix] + tokens[:seq_len - 1]``; window k predicts
    the next seq_len - 1 tokens from the one token before them on; a last, shorter prediction span takes
    its window's remaining tokens from the context before it (only its predictions are scored)."""
    per_window = seq_len - 1
    if len(token_list) < per_window:
        raise ConfigError(f"eval.seq_len={seq_len} is not allowed with eval.protocol=rolling: the text holds "
                          f"only {len(token_list)} tokens; lower eval.seq_len")
    rows, starts = [[prefix, *token_list[:per_window]]], [1]
    predicted = per_window
    while predicted < len(token_list):
        end = min(predicted + per_window, len(token_list))
        rows.append(token_list[end - seq_len : end])
        starts.append(seq_len - (end - predicted))
        predicted = end
    return EvalWindows(torch.tensor(rows, dtype=torch.long), torch.tensor(starts, dtype=torch.long), "rolling")


def calib_samples(tokens: torch.Tensor, seq_len: int, calib_size: int, seed: int) -> torch.Tensor:
    """``calib_size`` distinct windows drawn with a seeded generator, shape (calib_size, seq_len)."""
    available = tokens.numel() // seq_len
    if available < calib_size:
        raise ConfigError(f"calib_size={calib_size} is not allowed: the calibration text holds only "
                          f"{available} samples of {seq_len} tokens; lower calib_size or calib.seq_len, or "
                          "use a larger calib dataset")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(available, generator=generator)[:calib_size].sort().values
    return tokens[: available * seq_len].view(available, seq_len)[picks]


_token_counts: dict[tuple[str, str, str], int] = {}


def token_count(split: str, cfg: DataConfig, tokenizer, tokenizer_key: str) -> int:
    """Tokens of one split's text, counted once per (split, data setting, tokenizer) and process."""
    key = (split, repr(cfg), tokenizer_key)
    if key not in _token_counts:
        _token_counts[key] = int(tokenize(load_text(split, cfg), tokenizer).numel())
    return _token_counts[key]


def check(cfg: Config) -> None:
    """Preflight: the calibration and evaluation texts hold enough tokens for the samples and windows asked
    for (a missing, empty or short eval.path / calib.path fails here; the benchmark's prompts: bench.check)."""
    tokenizer, key = load_tokenizer(cfg.model), repr(cfg.model)
    calib = token_count("calib", cfg.calib, tokenizer, key)
    calib_samples(torch.zeros(calib, dtype=torch.long), cfg.calib.seq_len, cfg.calib_size, cfg.seed)
    evaluated = token_count("eval", cfg.eval, tokenizer, key)
    eval_windows(torch.zeros(evaluated, dtype=torch.long), cfg.eval.seq_len, cfg.eval.num_windows)
