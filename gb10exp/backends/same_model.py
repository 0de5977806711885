"""Does the engine serve the model whose accuracy the run measures? Compared through the tokenizer.

Two models with the same vocabulary and probe ids may still differ (two fine-tunes of one base), but two that
differ there are different models, and one model's token ids fed to the other give numbers about neither.
Engine backends call these in ``check``, before any quantization. Sources, best first: the GGUF's own
vocabulary (``tokenizer.ggml.tokens``), a server's tokenize endpoint (llama.cpp's ``/tokenize``,
llama-cpp-python's ``/extras/tokenize``, vLLM's ``/tokenize``), a server's vocabulary size (llama.cpp's
``/v1/models`` meta, Ollama's ``/api/show``). What could not be compared is said in the returned tag.
"""

from __future__ import annotations

from pathlib import Path

from gb10exp.config import ConfigError

# Plain English, code and digits: tokenized alike by every runtime of one tokenizer (llama.cpp and
# transformers disagree on some rare Unicode sequences of the same vocabulary), different across vocabularies.
PROBE = "The quick brown fox jumps over 13 lazy dogs.\ndef area(radius):\n    return 3.14159 * radius ** 2\n"
PADDING = 0.01  # an engine vocabulary up to 1% larger than the tokenizer's is padding (e.g. Qwen's 151936)


def probe_ids(tokenizer) -> list[int]:
    return list(tokenizer.encode(PROBE, add_special_tokens=False))


def strip_special(ids: list[int], tokenizer) -> list[int]:
    """A server's ids for PROBE without the BOS/EOS it may add around them."""
    ids = list(ids)
    while ids and ids[0] in {tokenizer.bos_token_id, tokenizer.cls_token_id} - {None}:
        ids = ids[1:]
    while ids and ids[-1] in {tokenizer.eos_token_id, tokenizer.sep_token_id} - {None}:
        ids = ids[:-1]
    return ids


def _different(key: str, difference: str) -> ConfigError:
    return ConfigError(f"{key} is not allowed: {difference}: a different model; serve the configured model, "
                       "choose the matching model=, or eval.enabled=false for speed only")


def compare_vocab(size: int, tokenizer, key: str, what: str) -> None:
    ours = len(tokenizer)
    if not ours <= size <= ours * (1 + PADDING):
        raise _different(key, f"{what} has a vocabulary of {size} tokens and the run's tokenizer {ours}")


def compare_ids(served: list[int], tokenizer, key: str, what: str) -> None:
    ours = probe_ids(tokenizer)
    if strip_special(served, tokenizer) != ours:
        raise _different(key, f"{what} tokenizes a probe text to {len(served)} tokens {served[:6]}... and "
                              f"the run's tokenizer to {len(ours)} {ours[:6]}...")


def compare_token_strings(tokens: list[str], tokenizer, key: str, what: str) -> None:
    """A vocabulary given as token strings (GGUF, Ollama): the probe's ids must name the same strings."""
    compare_vocab(len(tokens), tokenizer, key, what)
    ids = probe_ids(tokenizer)
    theirs = [tokens[i] for i in ids]
    ours = tokenizer.convert_ids_to_tokens(ids)
    if theirs != ours:
        bad = next(i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b)
        raise _different(key, f"{what} names token {ids[bad]} {theirs[bad]!r} where the run's tokenizer has "
                              f"{ours[bad]!r}")


def check_gguf(path: Path, tokenizer, key: str) -> tuple[str, str]:
    """Refuse a missing file, one that is not a GGUF, or a GGUF whose vocabulary is not the tokenizer's;
    (model name from general.name, tag) otherwise (``tokenizer`` None: only the file is checked)."""
    if not path.is_file():
        raise ConfigError(f"{key} is not allowed: no such file")
    from gb10exp.models.gguf_file import read_gguf

    try:
        fields = read_gguf(path).fields
    except ValueError as exc:
        raise ConfigError(f"{key} is not allowed: {path} is not a GGUF file that parses ({str(exc)[:100]}); "
                          "give a .gguf file (convert_hf_to_gguf.py writes one)") from None
    vocab = list(fields.get("tokenizer.ggml.tokens", ()))
    name = fields.get("general.name", path.stem)
    if tokenizer is None:
        return name, "not checked (speed only: eval.enabled=false)"
    if not vocab:
        return name, "not checked: the GGUF holds no tokenizer.ggml.tokens"
    compare_token_strings(vocab, tokenizer, key, f"the GGUF {path.name}")
    return name, f"ok: the GGUF's vocabulary ({len(vocab)} tokens) and probe tokens match the run's tokenizer"
