"""Evaluation protocols (windows, llamacpp, rolling), the in-run reference NLL, and the one byte count."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from inprocess import fresh_cache, new_store, run_job

from gb10exp import data
from gb10exp.config import ConfigError, EvalConfig, ModelConfig
from gb10exp.evaluate import cache as eval_cache
from gb10exp.evaluate import evaluate_accuracy
from gb10exp.models import random_llama
from gb10exp.utils import cache_dir

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    from gb10exp.models import load_tokenizer

    return load_tokenizer(ModelConfig(name="t", source="random", arch={"hidden_size": 64}))  # SmolLM2's


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The same tokenizer told to add its BOS (<|im_start|>, id 1), as Llama's tokenizers do."""
    t = copy.deepcopy(tokenizer)
    t.add_bos_token = True
    assert t("a")["input_ids"][0] == 1
    return t


def tiny_llama(vocab: int = 300):
    return random_llama(vocab_size=vocab)


# -- protocols -------------------------------------------------------------------------------------------
def test_protocol_is_validated_in_one_line():
    assert EvalConfig(dataset="pydoc_topics").protocol == "llamacpp"
    with pytest.raises(
        ConfigError,
        match=r"eval.protocol='lmeval' is not allowed: one of \['windows', 'llamacpp', "
        r"'rolling'\]",
    ):
        EvalConfig(dataset="pydoc_topics", protocol="lmeval")


def test_llamacpp_without_bos_scores_the_second_half(tokenizer):
    text = torch.arange(100, 140)
    w = data.eval_windows(text, 8, 4, "llamacpp", tokenizer)  # SmolLM2 adds no BOS: plain chunks
    assert torch.equal(w.tokens, text[:32].view(4, 8))
    # n_ctx 8, first = 4: logits at 4..6 predict tokens 5..7, as perplexity.cpp's n_ctx - first - 1
    assert w.score_from.tolist() == [5] * 4 and w.scored == [3] * 4


def test_llamacpp_with_bos_replaces_each_chunks_first_token(bos_tokenizer):
    text = torch.arange(100, 140)
    w = data.eval_windows(text, 8, 3, "llamacpp", bos_tokenizer)
    # The text tokenized with BOS ([1, 100, 101, ...]) cut in chunks of 8, each chunk's first token -> BOS.
    assert w.tokens.tolist() == [
        [1, 100, 101, 102, 103, 104, 105, 106],
        [1, 108, 109, 110, 111, 112, 113, 114],
        [1, 116, 117, 118, 119, 120, 121, 122],
    ]
    assert w.scored == [3, 3, 3]
    with pytest.raises(
        ConfigError,
        match=r"eval.num_windows=6 is not allowed: .* only 5 windows of 8 tokens "
        r"\(eval.protocol=llamacpp\)",
    ):
        data.eval_windows(text, 8, 6, "llamacpp", bos_tokenizer)


@pytest.mark.parametrize("length", [7, 8, 20, 21, 27])
def test_rolling_is_lm_evals_rolling_loglikelihood(length):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens, seq_len, prefix = list(range(100, 100 + length)), 8, 1
    w = data.rolling_windows(tokens, prefix, seq_len)
    expected = [make_disjoint_window(p) for p in get_rolling_token_windows(tokens, prefix, seq_len - 1, 1)]
    assert len(w) == len(expected)
    for row, start, (context, continuation) in zip(
        w.tokens.tolist(), w.score_from.tolist(), expected, strict=True
    ):
        # lm-eval feeds (context + continuation)[-(max_length + 1):][:-1] and scores the continuation.
        assert row == (context + continuation)[-seq_len:] and row[start:] == continuation
    scored = [t for row, s in zip(w.tokens.tolist(), w.score_from.tolist(), strict=True) for t in row[s:]]
    assert scored == tokens  # every token scored exactly once, in order


def test_rolling_gives_lm_evals_own_loglikelihood(tokenizer):
    """lm-eval's HFLM.loglikelihood_rolling with max_length = seq_len - 1, on a real tiny model: the same sum."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = tiny_llama(vocab=len(tokenizer))
    text = (
        "The quick brown fox jumps over the lazy dog. " * 12
    )  # 121 tokens: 3 full windows and a partial one
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=31, batch_size=4, device="cpu")
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    [expected] = lm.loglikelihood_rolling([request], disable_tqdm=True)
    windows = data.rolling_windows(data.tokenize(text, tokenizer).tolist(), data.prefix_token(tokenizer), 32)
    result = evaluate_accuracy(model, windows, 4, CPU)
    assert result.windows.tokens == [31, 31, 31, 28]
    assert -sum(result.windows.nll) == pytest.approx(expected, rel=1e-5)


def test_rolling_prefixes_bos_and_keeps_the_tokenizers_own(tokenizer, bos_tokenizer):
    text = torch.arange(100, 140)
    plain = data.eval_windows(text, 8, 3, "rolling", tokenizer)
    # lm-eval's prefix token is BOS whenever the tokenizer has one, added or not.
    assert plain.tokens[0].tolist() == [1, 100, 101, 102, 103, 104, 105, 106] and plain.scored == [7, 7, 7]
    assert plain.tokens[1].tolist() == list(range(106, 114))
    with_bos = data.eval_windows(text, 8, 3, "rolling", bos_tokenizer)
    # lm-eval encodes with the tokenizer's special tokens, then prefixes: BOS, BOS (itself scored), text.
    assert with_bos.tokens[0].tolist() == [1, 1, 100, 101, 102, 103, 104, 105]


def test_the_digest_covers_tokens_positions_and_protocol(tokenizer):
    text = torch.arange(100, 140)
    a = data.eval_windows(text, 8, 4, "windows")
    b = data.eval_windows(text, 8, 4, "llamacpp", tokenizer)
    assert torch.equal(a.tokens, b.tokens) and a.digest() != b.digest()
    assert a.digest() == data.eval_windows(text, 8, 4, "windows").digest()


def test_scores_only_the_protocols_positions_and_keeps_the_reference_nll(tokenizer):
    model = tiny_llama()
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    text = torch.randint(3, 300, (400,), generator=torch.Generator().manual_seed(0))
    w = data.eval_windows(text, 40, 5, "llamacpp", tokenizer)
    result = evaluate_accuracy(noisy, w, 2, CPU, baseline=model)
    with torch.no_grad():  # direct: cross-entropy over the targets 21..39 of each window only
        logits = noisy(w.tokens).logits
        direct = [
            F.cross_entropy(logits[i, 20:-1], w.tokens[i, 21:], reduction="sum").item() for i in range(5)
        ]
    assert result.windows.tokens == [19] * 5 and result.eval_tokens == 95
    assert result.windows.nll == pytest.approx(direct, rel=1e-5)
    # The reference's NLL on the same positions, from the logits KL already needed: the model alone gives it.
    alone = evaluate_accuracy(model, w, 5, CPU)
    assert result.windows.ref_nll == pytest.approx(alone.windows.nll, rel=1e-6)
    assert result.reference_perplexity == pytest.approx(alone.perplexity, rel=1e-6)
    assert result.metrics()["reference_nll_mean"] == pytest.approx(alone.nll_mean, rel=1e-6)
    assert "ref_nll" not in alone.as_dict()["windows"] and "reference_perplexity" not in alone.metrics()
    # ... and it survives the evaluation cache.
    entry = cache_dir("eval-test") / "entry"
    eval_cache.save(entry, result)
    loaded = eval_cache.load(entry)
    assert loaded.windows.ref_nll == result.windows.ref_nll and loaded.metrics() == result.metrics()


def test_in_run_reference_equals_the_bf16_run_on_the_same_windows(tmp_path, monkeypatch):
    fresh_cache(tmp_path / "cache", monkeypatch)
    store = new_store(tmp_path / "store")
    int4 = run_job(["qformat=int4", "eval.protocol=rolling"], store)
    bf16 = run_job(["qformat=bf16", "eval.protocol=rolling"], store)
    assert int4["windows"]["ref_nll"] == pytest.approx(bf16["windows"]["nll"], rel=1e-5)
    assert int4["metrics"]["reference_perplexity"] == pytest.approx(bf16["metrics"]["perplexity"], rel=1e-5)
    assert int4["windows"]["tokens"] == [63] * 4  # rolling: seq_len - 1 tokens per window, each once
    again = run_job(["qformat=int4", "eval.protocol=rolling", "force=true"], store)  # the eval cache hit
    assert again["windows"]["ref_nll"] == int4["windows"]["ref_nll"]
    off = run_job(["qformat=int4", "eval.protocol=rolling", "eval.compare_baseline=false"], store)
    assert "ref_nll" not in off["windows"] and "reference_perplexity" not in off["metrics"]


# -- llama.cpp itself ------------------------------------------------------------------------------------
def _llama_cpp_perplexity(llm, bos: int | None, stream: list[int], n_ctx: int, n_chunk: int) -> float:
    """llama.cpp's perplexity() (tools/perplexity/perplexity.cpp) over ``stream`` (the text tokenized with
    special tokens): chunks of n_ctx, each chunk's first token set to BOS when the vocabulary adds one,
    logits of positions first = n_ctx / 2 .. n_ctx - 2 scored against the next token."""
    import numpy as np

    first, nll, count = n_ctx // 2, 0.0, 0
    for i in range(n_chunk):
        chunk = stream[i * n_ctx : (i + 1) * n_ctx]
        if bos is not None:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[first : n_ctx - 1], dtype=np.float64)
        peak = logits.max(axis=1)
        log_z = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
        nll += float((log_z - logits[np.arange(len(logits)), chunk[first + 1 :]]).sum())
        count += n_ctx - first - 1
    return math.exp(nll / count)


def _f32_copy(source, out) -> None:
    """The GGUF's weights dequantized to F32 by llama.cpp's own quantizer: the very weights PyTorch runs
    (transformers dequantizes the same file), so llama.cpp's Q4_1 x Q8_1 kernels, which round activations
    to 8 bits (~0.6% perplexity here), do not hide what is compared: the protocol."""
    import ctypes

    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = 0, True  # LLAMA_FTYPE_ALL_F32
    with suppress_stdout_stderr(disable=False):
        assert (
            llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
        )


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llamacpp_protocol_agrees_with_llama_cpp(tokenizer, bos_tokenizer, tmp_path):
    import llama_cpp.llama_cpp as raw

    from gb10exp.backends.llamacpp.loader import load_llama
    from gb10exp.models import EMBEDDED, embedded_file, load_model

    n_ctx, n_chunk = 256, 3
    text = data.tokenize(data.load_text("eval", EvalConfig(dataset="pydoc_topics")), tokenizer)
    _f32_copy(embedded_file(EMBEDDED), tmp_path / "f32.gguf")
    # F32 weights and an F32 KV cache (type_k/type_v 0 = GGML_TYPE_F32; llama.cpp's default F16 cache rounds
    # every key and value to 2^-11 and moved perplexity by 8e-5 here): both sides then compute in float32.
    llm = load_llama(tmp_path / "f32.gguf", n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                     type_k=0, type_v=0)
    try:
        vocab = raw.llama_model_get_vocab(llm._model.model)
        gguf_adds_bos = bool(raw.llama_vocab_get_add_bos(vocab))
        assert (
            data.bos_to_add(tokenizer) is not None
        ) == gguf_adds_bos  # both read the GGUF's setting (no BOS)
        # The GGUF's own setting, then BOS forced on both sides (as for Llama tokenizers): BOS placement checked.
        cases = {"gguf": (tokenizer, None), "bos": (bos_tokenizer, raw.llama_vocab_bos(vocab))}
        reference = {}
        for name, (_, bos) in cases.items():
            stream = ([bos] if bos is not None else []) + text.tolist()  # llama.cpp's tokens, as the same ids
            reference[name] = _llama_cpp_perplexity(llm, bos, stream, n_ctx, n_chunk)
    finally:
        llm.close()
        (tmp_path / "f32.gguf").unlink()  # 540 MB
    model = load_model(EMBEDDED, CPU, torch.float32)
    for name, (tok, _) in cases.items():
        ours = evaluate_accuracy(model, data.eval_windows(text, n_ctx, n_chunk, "llamacpp", tok), 3, CPU)
        assert ours.eval_tokens == n_chunk * (n_ctx - n_ctx // 2 - 1)
        print(f"{name}: PyTorch {ours.perplexity:.4f}, llama.cpp {reference[name]:.4f}")
        # Float32 on both sides: only the order of summation differs (~1e-6 per logit; measured 9e-6 on
        # perplexity). 1e-4 is 10x that and 100x below the 1% the tool judges formats by: a protocol slip
        # (a token off, BOS misplaced, another half of the window scored) moves perplexity by whole percents.
        assert ours.perplexity == pytest.approx(reference[name], rel=1e-4), name
    assert reference["bos"] != reference["gguf"]  # the BOS really changed what llama.cpp scored
