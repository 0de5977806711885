"""Does the engine serve the model whose accuracy the run measures? Compared through the tokenizer.

Two models with the same tokenizer vocabulary and the same token ids for a probe text may still differ
(two fine-tunes of one base), but two that differ there are certainly different models, and feeding one
model's token ids to the other gives numbers about neither. Engine backends call these in ``check``,
before any quantization, and refuse a mismatch in one line. Sources, best first: the GGUF file's own
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


def compare_vocab(size: int, tokenizer, key: str, what: str) -> None:
    ours = len(tokenizer)
    if not ours <= size <= ours * (1 + PADDING):
        raise ConfigError(
            f"{key} is not allowed: {what} has a vocabulary of {size} tokens and the run's tokenizer "
            f"{ours}: a different model; serve the configured model, choose the matching model=, or "
            "eval.enabled=false for speed only"
        )


def compare_ids(served: list[int], tokenizer, key: str, what: str) -> None:
    ours = probe_ids(tokenizer)
    if strip_special(served, tokenizer) != ours:
        raise ConfigError(
            f"{key} is not allowed: {what} tokenizes a probe text to {len(served)} tokens "
            f"{served[:6]}... and the run's tokenizer to {len(ours)} {ours[:6]}...: a different model; "
            "serve the configured model, choose the matching model=, or eval.enabled=false for speed only"
        )


def compare_token_strings(tokens: list[str], tokenizer, key: str, what: str) -> None:
    """A vocabulary given as token strings (GGUF, Ollama): the probe's ids must name the same strings."""
    compare_vocab(len(tokens), tokenizer, key, what)
    ids = probe_ids(tokenizer)
    theirs = [tokens[i] for i in ids]
    ours = tokenizer.convert_ids_to_tokens(ids)
    if theirs != ours:
        bad = next(i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b)
        raise ConfigError(
            f"{key} is not allowed: {what} names token {ids[bad]} {theirs[bad]!r} where the run's "
            f"tokenizer has {ours[bad]!r}: a different model; serve the configured model, choose the "
            "matching model=, or eval.enabled=false for speed only"
        )


def gguf_fields(path: Path) -> tuple[list[str], str]:
    """(vocabulary as token strings, general.name) of a GGUF file, from its header."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError, struct/index errors on truncated or foreign files
        raise ConfigError(f"{path} is not a GGUF file that parses ({type(exc).__name__}: {str(exc)[:100]}); "
                          "give a .gguf file (convert_hf_to_gguf.py writes one)") from None
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = [bytes(tokens.parts[i]).decode("utf-8", errors="replace") for i in tokens.data] if tokens else []
    name = reader.fields.get("general.name")
    return vocab, bytes(name.parts[name.data[0]]).decode("utf-8", errors="replace") if name else path.stem


def check_gguf(path: Path, tokenizer, key: str) -> tuple[str, str]:
    """Refuse a file that is not a GGUF, or a GGUF whose vocabulary is not the tokenizer's; (model name, tag)
    otherwise (``tokenizer`` None: only the file is checked)."""
    try:
        vocab, name = gguf_fields(path)
    except ConfigError as exc:
        raise ConfigError(f"{key} is not allowed: {exc}") from None
    if tokenizer is None:
        return name, "not checked (speed only: eval.enabled=false)"
    if not vocab:
        return name, "not checked: the GGUF holds no tokenizer.ggml.tokens"
    compare_token_strings(vocab, tokenizer, key, f"the GGUF {path.name}")
    return name, f"ok: the GGUF's vocabulary ({len(vocab)} tokens) and probe tokens match the run's tokenizer"
