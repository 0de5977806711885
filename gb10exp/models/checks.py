"""Checks that a local model file or folder can work, made before anything heavy is loaded.

A truncated download or a non-causal model otherwise fails minutes later, deep inside transformers,
with a message that does not say which setting is wrong.
"""

from __future__ import annotations

import functools
from pathlib import Path

from gb10exp.config import ConfigError, ModelConfig

# Architectures that are decoder LMs even when their class name says otherwise (multimodal wrappers).
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@functools.lru_cache(maxsize=16)
def _gguf_problem(path: str, size: int, mtime: float) -> str | None:
    """Why the GGUF file cannot be read (bad magic, truncated tensor data), or None. Cached per file state."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)  # parses the header and every tensor's extent; a truncated file fails here
    except Exception as exc:  # gguf raises ValueError, numpy errors, struct errors
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else type(exc).__name__
    return None


def check_gguf(path: Path, key: str) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    problem = "not a GGUF file (no GGUF magic)" if magic != b"GGUF" else None
    if problem is None:
        stat = path.stat()
        problem = _gguf_problem(str(path), stat.st_size, stat.st_mtime)
    if problem:
        raise ConfigError(
            f"{key}={str(path)!r} is a truncated or corrupt GGUF file ({problem}); download or convert it again"
        )


def check_causal_lm(location: str, cfg: ModelConfig) -> None:
    """The folder's config.json must describe a decoder LM (gb10exp quantizes and measures those)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.path={cfg.path!r} has no readable config.json ({str(exc).splitlines()[0][:120]}); "
            "give a transformers model folder or a .gguf file"
        ) from exc
    architectures = list(getattr(config, "architectures", None) or [])
    known = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    causal_class = any(a.endswith(CAUSAL_SUFFIXES) for a in architectures)
    if not known or (architectures and not causal_class):
        what = ", ".join(architectures) or config.model_type
        raise ConfigError(
            f"model={cfg.name!r} is not a causal language model ({what}); "
            "gb10exp quantizes decoder LMs such as Llama, Qwen, Mistral"
        )


def check_local(cfg: ModelConfig) -> None:
    path = Path(cfg.path).expanduser()
    if path.is_file():
        check_gguf(path, "model.path")
    elif cfg.gguf_file:
        check_gguf(path / cfg.gguf_file, "model.gguf_file")
    else:
        check_causal_lm(str(path), cfg)
