"""backend=openai against the response shapes of servers that cannot run here, replayed by a real HTTP
server on loopback (http.server). The shapes follow each server's protocol code:

- trtllm-serve (NVIDIA/TensorRT-LLM tensorrt_llm/serve/openai_protocol.py): pydantic models with
  extra="forbid"; CompletionLogProbs of the generated tokens only, even with echo; stream chunks carry
  token_ids/stop_reason and a usage-only chunk (choices []); errors are {"object": "error", "message", ...};
  POST /_internal/tokenize {"prompt"} -> {"count", "tokens"}.
- vLLM (vllm/entrypoints/openai/protocol.py): echo + logprobs give every prompt token (the first null)
  with text_offset; POST /tokenize -> {"count", "max_model_len", "tokens"}; errors {"error": {...}}.
- Ollama (openai/openai.go): echo ignored; logprobs, when present, chat-style {"content": [...]};
  no tokenize endpoint, vocabulary in POST /api/show's model_info.
- llama.cpp's llama-server: /v1/models meta (n_vocab, size); POST /tokenize {"content"}; echo + logprobs
  answered with HTTP 500 "Only no echo is supported".
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import TINY, cli_error, mlflow_runs, run_gb10exp

from gb10exp.backends import BenchInputs
from gb10exp.backends.openai.backend import OpenAIBackend, ServerError
from gb10exp.backends.openai.config import OpenAIOptions
from gb10exp.bench import LEAD
from gb10exp.config import BenchConfig, ConfigError, QFormatConfig
from gb10exp.evaluate.engine import EngineAccuracyUnavailable
from gb10exp.models import load_tokenizer
from gb10exp.quant import formats

MODEL = "served-model"
SIZE = 123_456_789  # llama-server's meta "size": the served weights' bytes


@pytest.fixture(scope="module")
def tokenizer():
    from gb10exp.config import ModelConfig

    return load_tokenizer(ModelConfig(name="tiny", source="random", arch={"hidden_size": 8}))


class Replay:
    """One server flavour on loopback; ``requests`` records every request body it received."""

    def __init__(self, flavour: str, tokenizer, shift: int = 0):
        self.flavour, self.tok, self.shift = flavour, tokenizer, shift
        self.requests: list[tuple[str, dict]] = []
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                replay.requests.append((self.path, {}))
                replay.answer(self, *replay.get(self.path))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                replay.requests.append((self.path, body))
                replay.answer(self, *replay.post(self.path, body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def answer(handler, code: int, payload, stream: list | None = None):
        handler.send_response(code)
        if stream is not None:
            handler.send_header("Content-Type", "text/event-stream")
            handler.end_headers()
            for chunk in stream:
                handler.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            handler.wfile.write(b"data: [DONE]\n\n")
            return
        data = json.dumps(payload).encode()
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def ids(self, text: str) -> list[int]:
        return [i + self.shift for i in self.tok.encode(text, add_special_tokens=False)]

    # -- endpoints ------------------------------------------------------------------------------------
    def get(self, path: str):
        if path != "/v1/models":
            return 404, {"detail": "Not Found"}
        card = {
            "id": MODEL,
            "object": "model",
            "created": 0,
            "owned_by": {"trtllm": "tensorrt_llm", "vllm": "vllm", "ollama": "library"}.get(
                self.flavour, "llamacpp"
            ),
        }
        if self.flavour == "llama-server":
            card["meta"] = {
                "vocab_type": 2,
                "n_vocab": len(self.tok) + self.shift,
                "n_ctx_train": 8192,
                "n_embd": 576,
                "n_params": 134515008,
                "size": SIZE,
            }
        return 200, {"object": "list", "data": [card]}

    def post(self, path: str, body: dict):
        f = self.flavour
        if f == "trtllm" and path == "/_internal/tokenize":
            tokens = self.ids(body["prompt"])
            return 200, {"count": len(tokens), "tokens": tokens}
        if f == "vllm" and path == "/tokenize" and "prompt" in body:
            tokens = self.ids(body["prompt"])
            return 200, {"count": len(tokens), "max_model_len": 8192, "tokens": tokens, "token_strs": None}
        if f == "llama-server" and path == "/tokenize" and "content" in body:
            return 200, {"tokens": self.ids(body["content"])}
        if f == "ollama" and path == "/api/show":
            vocab = self.tok.convert_ids_to_tokens(list(range(len(self.tok))))
            return 200, {
                "model_info": {
                    "general.architecture": "llama",
                    "llama.vocab_size": len(vocab),
                    "tokenizer.ggml.tokens": vocab[self.shift :] + vocab[: self.shift],
                }
            }
        if path != "/v1/completions":
            return 404, {"error": {"message": "Not Found", "type": "not_found_error", "code": 404}}
        if f == "trtllm":
            extra = set(body) - {
                "model",
                "prompt",
                "max_tokens",
                "echo",
                "logprobs",
                "temperature",
                "stream",
                "stream_options",
                "min_tokens",
                "ignore_eos",
            }
            if extra:  # extra="forbid"
                return 400, {
                    "object": "error",
                    "message": f"Extra inputs are not permitted: {extra}",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
        prompt = body["prompt"]
        n = len(prompt) if isinstance(prompt, list) else len(self.ids(prompt))
        if body.get("stream"):
            return 200, None, self.stream(body, n)
        return self.complete(body, prompt, n)

    def complete(self, body: dict, prompt, n: int):
        f, usage = self.flavour, {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}
        if f == "llama-server" and body.get("echo"):
            return 500, {
                "error": {"code": 500, "message": "Only no echo is supported", "type": "server_error"}
            }
        choice = {"index": 0, "text": " x", "finish_reason": "length"}
        if f == "trtllm":  # the generated token's log-probability only, echo or not
            choice["logprobs"] = {
                "text_offset": [0],
                "token_logprobs": [-1.0],
                "tokens": [" x"],
                "top_logprobs": [],
            }
        elif f == "vllm":
            text = prompt if isinstance(prompt, str) else self.tok.decode(prompt)
            offsets, at = [], 0
            for i in prompt if isinstance(prompt, list) else self.ids(prompt):
                offsets.append(at)
                at += len(self.tok.decode([i]))
            choice |= {
                "text": text + " x",
                "logprobs": {
                    "text_offset": offsets + [len(text)],
                    "token_logprobs": [None] + [-0.5] * (n - 1) + [-1.0],
                    "tokens": ["t"] * (n + 1),
                    "top_logprobs": [None] + [{"t": -0.5}] * n,
                },
            }
        elif f == "ollama":
            choice["logprobs"] = {
                "content": [{"token": " x", "logprob": -1.0, "bytes": [32, 120], "top_logprobs": []}]
            }
        return 200, {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 0,
            "model": MODEL,
            "choices": [choice],
            "usage": usage,
        }

    def stream(self, body: dict, n: int) -> list[dict]:
        out, f = body["max_tokens"], self.flavour
        head = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL}
        chunks = []
        for k in range(out):
            choice = {
                "index": 0,
                "text": f" t{k}",
                "logprobs": None,
                "finish_reason": "length" if k == out - 1 and f in ("trtllm", "vllm") else None,
            }
            if f == "trtllm":
                choice |= {"token_ids": [100 + k], "stop_reason": None}
            chunks.append(head | {"choices": [choice]} | ({"usage": None} if f == "trtllm" else {}))
        if f in ("llama-server", "ollama"):  # a closing chunk with no token
            chunks.append(head | {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append(
                head
                | {
                    "choices": [],
                    "usage": {"prompt_tokens": n, "completion_tokens": out, "total_tokens": n + out},
                }
            )
        return chunks


@pytest.fixture
def serve(tokenizer):
    servers = []

    def start(flavour: str, shift: int = 0) -> Replay:
        servers.append(Replay(flavour, tokenizer, shift))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


BF16 = formats.of(QFormatConfig(name="bf16"))
CFG = BenchConfig(input_len=24, output_len=5, warmup=1, repeats=2)


def windows(tokenizer, n=2, length=32) -> torch.Tensor:
    ids = tokenizer.encode(" ".join(f"word{i} and text" for i in range(200)), add_special_tokens=False)
    return torch.tensor(ids[: n * length]).view(n, length)


def backend_for(replay: Replay, tokenizer, **options) -> OpenAIBackend:
    backend = OpenAIBackend(OpenAIOptions(base_url=replay.url, **options))
    backend.check(BF16, tokenizer)
    backend.prepare(BenchInputs(None, tokenizer, windows(tokenizer, 8).flatten(), torch.device("cpu"), BF16))
    return backend


@pytest.mark.parametrize(
    "flavour, check",
    [
        ("trtllm", "probe token ids (/_internal/tokenize)"),
        ("vllm", "probe token ids (/tokenize)"),
        ("llama-server", "probe token ids (/tokenize), vocabulary size"),
        ("ollama", "vocabulary and probe token strings (/api/show)"),
    ],
)
def test_same_model_is_checked_through_what_each_server_offers(serve, tokenizer, flavour, check):
    backend = backend_for(serve(flavour), tokenizer)
    assert backend.model == MODEL and backend.model_check == f"ok: {check} match the run's tokenizer"


@pytest.mark.parametrize(
    "flavour, shown",
    [
        ("trtllm", "tokenizes a probe text"),
        ("vllm", "tokenizes a probe text"),
        ("llama-server", "tokenizes a probe text"),
        ("ollama", "names token"),
    ],
)
def test_a_server_holding_another_model_is_refused_in_one_line(serve, tokenizer, flavour, shown):
    replay = serve(flavour, shift=7)  # another vocabulary: every id moved
    with pytest.raises(
        ConfigError, match=rf"backend.options.model='{MODEL}' is not allowed: .*{shown}.*a different model"
    ):
        OpenAIBackend(OpenAIOptions(base_url=replay.url)).check(BF16, tokenizer)
    assert all(path != "/v1/completions" for path, _ in replay.requests)  # nothing was generated first


def test_vllm_echo_logprobs_are_scored_only_over_the_prompt(serve, tokenizer):
    for fmt in ("tokens", "text"):
        backend = backend_for(serve("vllm"), tokenizer, prompt_format=fmt)
        scored = backend.perplexity(windows(tokenizer))
        for nll, count in scored:  # 31 prompt tokens after the first at -0.5 each; the generated -1.0 never
            assert count == 31 and nll == pytest.approx(0.5 * 31)


@pytest.mark.parametrize(
    "flavour, reason",
    [
        ("trtllm", "returned 1 log-probabilities for a 32-token prompt"),
        ("llama-server", "HTTP 500 from /completions with echo \\+ logprobs: .*Only no echo is supported"),
        ("ollama", "chat-style logprobs"),
    ],
)
def test_servers_without_prompt_logprobs_degrade_to_a_reason(serve, tokenizer, flavour, reason):
    backend = backend_for(serve(flavour), tokenizer, prompt_format="tokens")
    with pytest.raises(EngineAccuracyUnavailable, match=reason):
        backend.perplexity(windows(tokenizer))


@pytest.mark.parametrize("flavour", ["trtllm", "vllm", "ollama", "llama-server"])
def test_streams_of_every_server_are_timed_from_chunks_and_counted_by_usage(serve, tokenizer, flavour):
    replay = serve(flavour)
    backend = backend_for(replay, tokenizer, prompt_format="tokens")
    cfg = BenchConfig(input_len=24, output_len=5, warmup=1, repeats=2, batch_size=2, depth=8)
    metrics, tags = backend.benchmark(
        BenchInputs(None, tokenizer, windows(tokenizer, 8).flatten(), torch.device("cpu"), BF16), cfg
    )
    assert metrics["decode_tokens_per_s"] > 0 and metrics["server_prompt_tokens"] == 32  # depth + input
    assert tags["bench.usage"].startswith("usage") and tags["bench.label"] == "pp24+tg5 @ d8, 2 concurrent"
    assert tags["bench.depth_prefill"].startswith("timed")
    prompts = [b["prompt"] for p, b in replay.requests if p == "/v1/completions" and b.get("stream")]
    assert len(prompts) == 6 and len({tuple(p[:LEAD]) for p in prompts}) == 6  # 3 requests x 2: unique leads
    scored = windows(tokenizer, 8).tolist()
    assert not any(p[:LEAD] == w[:LEAD] for p in prompts for w in scored)
    if flavour == "llama-server":  # the served weights' bytes from its /v1/models meta
        assert metrics["engine_weight_gib"] == pytest.approx(SIZE / 2**30)
        assert tags["roofline.bytes_source"] == "the server (/v1/models meta size)"


def test_error_chunks_raise(serve, tokenizer):
    replay = serve("vllm")
    backend = backend_for(replay, tokenizer, prompt_format="tokens")
    replay.stream = lambda body, n: [
        {"error": {"message": "KV cache exhausted", "type": "InternalServerError", "code": 500}}
    ]
    with pytest.raises(ServerError, match="KV cache exhausted"):
        backend._stream_once([1, 2, 3, 4, 5], CFG, 0.0)
    replay.complete = lambda body, prompt, n: (
        500,
        {
            "error": {
                "message": "CUDA error: illegal memory access",
                "type": "InternalServerError",
                "code": 500,
            }
        },
    )
    with pytest.raises(ServerError, match="illegal memory access"):  # a real failure is no "not supported"
        backend.perplexity(windows(tokenizer))


def test_a_short_stream_fails_rather_than_timing_a_shorter_answer(serve, tokenizer):
    replay = serve("vllm")
    backend = backend_for(replay, tokenizer, prompt_format="tokens")
    original = replay.stream
    replay.stream = lambda body, n: original(
        body | {"max_tokens": body["max_tokens"] - 1}, n
    )  # stopped at EOS
    with pytest.raises(RuntimeError, match="streamed 4 token chunks and counted 4 tokens for max_tokens=5"):
        backend._stream_once([1, 2, 3, 4, 5], CFG, 0.0)


@pytest.mark.slow
def test_a_run_against_llama_server_finishes_with_accuracy_tagged_unavailable(serve, tmp_path):
    replay = serve("llama-server")
    out = run_gb10exp(
        *TINY,
        "backend=openai",
        f"backend.options.base_url={replay.url}",
        "qformat=bf16",
        "bench.enabled=true",
        "bench.input_len=16",
        "bench.output_len=4",
        "bench.warmup=1",
        "bench.repeats=2",
        store=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path)
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["engine_ppl_check"].startswith("engine accuracy not available: HTTP 500")
    assert "engine_perplexity" not in run.data.metrics and run.data.metrics["perplexity"] > 1
    assert run.data.tags["engine.model_check"].startswith("ok: probe token ids (/tokenize)")
    assert run.data.metrics["engine_weight_gib"] == pytest.approx(SIZE / 2**30)


@pytest.mark.slow
def test_a_mismatched_server_is_refused_before_quantization_and_speed_only_runs_it(serve, tmp_path):
    replay = serve("vllm", shift=3)
    args = (*TINY, "backend=openai", f"backend.options.base_url={replay.url}", "qformat=int4")
    # The CLI's own check, in preflight: before any job, so before any quantization or MLflow run (cli_error
    # asserts one line and an untouched store).
    line = cli_error(*args, store=tmp_path)
    assert "the server (/tokenize) tokenizes a probe text to 34 tokens" in line and "a different model" in line

    out = run_gb10exp(
        *args,
        "eval.enabled=false",
        "bench.enabled=true",
        "bench.input_len=16",
        "bench.output_len=4",
        "bench.warmup=1",
        "bench.repeats=2",
        "bench.model_bytes=2e9",
        store=tmp_path / "speed",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path / "speed")
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == f"{MODEL}-speed-openai"
    assert run.data.tags["engine.model_check"] == "not checked: speed only (eval.enabled=false)"
    assert "perplexity" not in run.data.metrics and run.data.metrics["decode_tokens_per_s"] > 0
    assert run.data.metrics["engine_weight_gib"] == pytest.approx(2e9 / 2**30)
