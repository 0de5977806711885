"""backend=openai against a real OpenAI-compatible server: llama-cpp-python's, started by the test on
127.0.0.1 (a free port, a hard time limit, stopped at the end); plus the pure parsing logic."""

from __future__ import annotations

import json
import sys
import urllib.request

import numpy as np
import pytest
from conftest import free_port, mlflow_runs, run_gb10exp, serving

from gb10exp.backends.openai.backend import is_token_chunk, prompt_logprobs, sse_data

SMALL = ["calib_size=4", "calib.seq_len=128", "eval.seq_len=128", "eval.num_windows=4", "bench.input_len=64",
         "bench.output_len=12", "bench.warmup=1", "bench.repeats=3", "bench.engine_ppl_windows=1"]
SERVER_LIFETIME_S = 900  # the server exits by itself after this, whatever happens to the test


def test_stream_parsing_counts_tokens_not_closing_chunks():
    lines = [b'data: {"choices": [{"text": "a", "finish_reason": null}]}\n', b"\n",
             b'data: {"choices": [{"text": "", "finish_reason": null}]}\n',  # half a UTF-8 character: a token
             b'data: {"choices": [{"text": "b", "finish_reason": "length"}]}\n',  # vLLM: last token + reason
             b'data: {"choices": [{"text": "", "finish_reason": "length"}]}\n',  # llama.cpp: closing chunk
             b'data: {"choices": [], "usage": {"completion_tokens": 3}}\n', b"data: [DONE]\n", b'data: {"x": 1}\n']
    chunks = list(sse_data(iter(lines)))
    assert len(chunks) == 5 and [is_token_chunk(c) for c in chunks] == [True, True, True, False, False]


def test_prompt_logprobs_keep_prompt_tokens_only():
    choice = {"logprobs": {"token_logprobs": [None, -1.0, -2.0, -3.0], "text_offset": [0, 3, 6, 9]}}
    assert prompt_logprobs(choice, prompt_chars=9) == [-1.0, -2.0]  # the 4th is the generated token


@pytest.fixture(scope="module")
def q4_gguf():
    from gb10exp.backends.llamacpp.gguf import build_gguf
    from gb10exp.models import EMBEDDED

    path, _ = build_gguf(EMBEDDED, "Q4_K_M", model=None, tokenizer=None)  # re-quantized from the embedded Q4_1
    return path


@pytest.fixture(scope="module")
def server(q4_gguf):
    port = free_port()
    command = ["timeout", str(SERVER_LIFETIME_S), sys.executable, "-m", "llama_cpp.server", "--model", str(q4_gguf),
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024"]
    url = f"http://127.0.0.1:{port}/v1"
    with serving(command, url + "/models", "llama-cpp-python's server"):
        yield url


@pytest.mark.slow
@pytest.mark.llamacpp
def test_openai_streaming_run_against_a_real_server(tmp_path, server, q4_gguf):
    out = run_gb10exp("backend=openai", f"backend.options.base_url={server}", f"backend.options.gguf={q4_gguf}",
                      "qformat=gguf_q4_k_m", *SMALL, store=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path)
    m, tags = runs[0].data.metrics, runs[0].data.tags
    assert m["ttft_s"] > 0 and m["decode_tokens_per_s"] > 0 and 0 < m["roofline_fraction"] <= 1
    assert tags["roofline.bytes_source"] == "the served GGUF file"
    # llama-cpp-python 0.3.36's server returns echo log-probabilities one position late (see the next
    # test): the engine-perplexity check flags it, as it would flag a kernel computing garbage.
    assert tags["engine_ppl_check"].startswith("MISMATCH") and m["engine_ppl_ratio"] > 2


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llama_cpp_python_server_echo_logprobs_are_one_position_late(server, q4_gguf):
    import llama_cpp

    text = "The quick brown fox jumps over the lazy dog."
    body = {"prompt": text, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    request = urllib.request.Request(server + "/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    served = prompt_logprobs(json.load(urllib.request.urlopen(request, timeout=60))["choices"][0], len(text))

    llm = llama_cpp.Llama(str(q4_gguf), n_ctx=64, logits_all=True, verbose=False)
    tokens = llm.tokenize(text.encode(), add_bos=False)
    llm.eval(tokens)
    scores = llm.scores[: len(tokens)].astype(np.float64)
    logp = scores - (np.log(np.exp(scores - scores.max(1, keepdims=True)).sum(1, keepdims=True))
                     + scores.max(1, keepdims=True))
    llm.close()
    correct = [logp[i - 1, tokens[i]] for i in range(1, len(tokens))]  # log p(token i | tokens before it)
    late = [logp[i, tokens[i]] for i in range(1, len(tokens))]  # what the server returns
    assert np.allclose(served, late, atol=0.05) and not np.allclose(served, correct, atol=0.5)
