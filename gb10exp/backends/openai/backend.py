"""Any OpenAI-compatible server over HTTP (Ollama's ``/v1``, ``trtllm-serve``, ``vllm serve``, llama.cpp's and
llama-cpp-python's servers), started by the user; the run only talks to it, after ``check`` compared the
served model's tokenizer with the run's (``same_model.py``; ``eval.enabled=false``: not compared, speed only).

Speed: streamed ``/completions``, TTFT at the first token, one stamp per later chunk, checked against the
closing ``usage`` (a server that packs several tokens into a chunk fails the run rather than being timed
wrong); ``bench.batch_size`` concurrent requests, each with its own lead (``gb10exp.bench.variants``).
Accuracy: ``echo`` + ``logprobs`` (``prompt_logprobs``), used only when they cover the whole prompt. Anything
else is "engine accuracy not available" with the reason as a tag, never a number: ``llama-server`` answers
HTTP 500 "Only no echo is supported", trtllm-serve returns the generated token's log-probability only,
chat-style shapes carry none. Wrong ones are caught by the engine-perplexity check (llama-cpp-python 0.3.36's
server returns entry i from the distribution *after* token i).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from gb10exp import hardware
from gb10exp.backends import same_model
from gb10exp.backends.base import Backend, BenchInputs
from gb10exp.backends.openai.config import OpenAIOptions
from gb10exp.bench import Target, Timing, measure, merge_concurrent, now, variants
from gb10exp.config import BenchConfig, ConfigError
from gb10exp.evaluate.engine import EngineAccuracyUnavailable
from gb10exp.quant import bytes as qbytes
from gb10exp.quant.formats import Format

SERVER_HINT = ("start the server first, e.g. python -m gb10exp.backends.llamacpp.serve --model F.gguf, ollama serve, "
               "trtllm-serve DIR, vllm serve MODEL")
# How servers say "this request is fine but I cannot do that" (echo, logprobs, prompt logprobs).
NOT_SUPPORTED = re.compile(r"not (be )?supported|unsupported|not implemented|only no echo|not allowed|"
                           r"\becho\b|logprobs", re.IGNORECASE)


class ServerError(RuntimeError):
    """The server answered with an error the run cannot work around."""


def error_text(payload) -> str:
    """The message of an OpenAI-style error body: {"error": {"message": ...}}, {"error": "..."}, {"detail": ...}."""
    err = payload.get("error", payload.get("detail", payload)) if isinstance(payload, dict) else payload
    return str(err.get("message") or err) if isinstance(err, dict) else str(err)


def is_token_chunk(chunk: dict) -> bool:
    """A streamed chunk that carries a token: text, or no finish_reason yet (a token whose text is an
    incomplete UTF-8 sequence arrives empty). A closing chunk with empty text and a finish_reason (as
    llama.cpp's servers send) or a usage-only chunk carries none."""
    choices = chunk.get("choices") or []
    return bool(choices) and (bool(choices[0].get("text")) or choices[0].get("finish_reason") is None)


def sse_data(lines: Iterator[bytes]) -> Iterator[dict]:
    """The JSON payloads of a server-sent-events stream, up to ``[DONE]``; an error payload raises."""
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        payload = json.loads(data)
        if isinstance(payload, dict) and ("error" in payload or payload.get("object") == "error"):
            raise ServerError(f"the server streamed an error: {error_text(payload)[:300]}")
        yield payload


def prompt_logprobs(choice: dict, prompt_tokens: int | None, prompt_chars: int | None = None,
                    generated: int = 1) -> list[float]:
    """log p(token i | tokens before it) for prompt tokens 1..n-1 from an ``echo`` + ``logprobs`` choice.

    ``prompt_tokens``: the prompt's length in the server's tokens (the ids sent, or ``usage.prompt_tokens``);
    when unknown, ``text_offset`` separates the prompt (offsets before ``prompt_chars``) from the answer.
    Raises EngineAccuracyUnavailable unless the values cover exactly the prompt plus ``generated`` tokens."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("token_logprobs"), list):
        shape = "chat-style logprobs" if isinstance(logprobs, dict) and "content" in logprobs else "no logprobs"
        raise EngineAccuracyUnavailable(f"the server returned {shape}, not completion token_logprobs")
    values = logprobs["token_logprobs"]
    offsets = logprobs.get("text_offset")
    if prompt_chars is not None and isinstance(offsets, list) and len(offsets) == len(values):
        # Text prompts: the offsets tell prompt entries from generated ones, whatever the server left out
        # (llama-cpp-python echoes the prompt but not the generated token; others add it, or a BOS).
        end = sum(1 for off in offsets if off < prompt_chars)
        if prompt_tokens is not None and end not in (prompt_tokens, prompt_tokens - 1):
            raise EngineAccuracyUnavailable(
                f"the server echoed {end} log-probabilities for a {prompt_tokens}-token prompt: it does not "
                "echo the prompt's log-probabilities")
    elif prompt_tokens is None:
        raise EngineAccuracyUnavailable("the server reported neither usage.prompt_tokens nor text offsets: "
                                        "its prompt tokens cannot be told from the generated one")
    # llama-cpp-python leaves out the BOS it added (and counted in usage): one fewer is the whole prompt too.
    elif len(values) - generated not in (prompt_tokens, prompt_tokens - 1):
        raise EngineAccuracyUnavailable(
            f"the server returned {len(values)} log-probabilities for a {prompt_tokens}-token prompt and "
            f"{generated} generated token(s): it does not echo the prompt's log-probabilities")
    else:
        end = len(values) - generated
    scored = values[1:end]  # the first has no context; generated ones are never scored
    if len(scored) < 1 or any(not isinstance(v, int | float) for v in scored):
        raise EngineAccuracyUnavailable("the server's prompt log-probabilities have gaps (null entries)")
    return [float(v) for v in scored]


class OpenAIBackend(Backend):
    name = "openai"
    engine_package = None  # the server's engine is not in this process

    def __init__(self, options: OpenAIOptions):
        self.base_url, self.model, self.api_key_env = options.base_url.rstrip("/"), options.model, options.api_key_env
        self.root = re.sub(r"/v1$", "", self.base_url)  # native endpoints (tokenize, api/show) live beside /v1
        self.prompt_format, self.device, self.timeout_s = options.prompt_format, options.device, options.timeout_s
        self.gguf = Path(options.gguf).expanduser() if options.gguf else None
        self.force_length = list(options.force_length)
        self.tokenizer = None
        self.served_model: str | None = None
        self.meta: dict = {}  # llama.cpp's server: n_vocab, size (bytes), n_params, ... of the served model
        self.model_check = ""
        self.include_usage = True

    def _request(self, path: str, body: dict | None = None, timeout: float | None = None, root: bool = False):
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get(self.api_key_env):  # read at request time, never stored or logged
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request((self.root if root else self.base_url) + path, data=data, headers=headers)
        return urllib.request.urlopen(req, timeout=timeout or self.timeout_s)

    def _post_json(self, path: str, body: dict) -> dict | None:
        """A native endpoint's JSON answer, or None where the server has no such endpoint."""
        try:
            with self._request(path, body, timeout=30, root=True) as r:
                got = json.load(r)
        except (urllib.error.URLError, OSError, ValueError):
            return None
        return got if isinstance(got, dict) and "error" not in got and got.get("object") != "error" else None

    def check(self, fmt: Format, tokenizer=None) -> None:
        try:
            with self._request("/models", timeout=10) as r:
                listed = json.load(r).get("data", [])
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ConfigError(f"backend.options.base_url={self.base_url!r} cannot be reached "
                              f"({getattr(exc, 'reason', exc)}); {SERVER_HINT}") from exc
        served = [m["id"] for m in listed]
        if self.model is None:
            if not served:
                raise ConfigError(f"backend.options.model=None is not allowed: {self.base_url}/models lists no model")
            self.model = served[0]
        elif served and self.model not in served:
            raise ConfigError(f"backend.options.model={self.model!r} is not allowed: the server has {served}")
        self.served_model = self.model
        self.meta = next((m.get("meta") or {} for m in listed if m["id"] == self.model), {})
        if self.gguf is not None:  # a GGUF that parses (its bytes are the roofline's), whatever else is checked
            same_model.check_gguf(self.gguf, None, f"backend.options.gguf={str(self.gguf)!r}")
        self.model_check = ("not checked: speed only (eval.enabled=false)" if tokenizer is None
                            else self._check_same_model(tokenizer))

    def _check_same_model(self, tokenizer) -> str:
        key, done = f"backend.options.model={self.model!r}", []
        if self.gguf is not None:
            same_model.check_gguf(self.gguf, tokenizer, f"backend.options.gguf={str(self.gguf)!r}")
            done.append("the GGUF's vocabulary")
        tokenize = [("/tokenize", {"content": same_model.PROBE, "add_special": False}),  # llama.cpp's llama-server
                    ("/tokenize", {"model": self.model, "prompt": same_model.PROBE}),  # vLLM
                    ("/extras/tokenize", {"input": same_model.PROBE}),  # llama-cpp-python
                    ("/_internal/tokenize", {"prompt": same_model.PROBE})]  # trtllm-serve (recent 1.x)
        for path, body in tokenize:
            got = self._post_json(path, body)
            if got and isinstance(got.get("tokens"), list) and all(isinstance(t, int) for t in got["tokens"]):
                same_model.compare_ids(got["tokens"], tokenizer, key, f"the server ({path})")
                done.append(f"probe token ids ({path})")
                break
        if isinstance(self.meta.get("n_vocab"), int):
            same_model.compare_vocab(self.meta["n_vocab"], tokenizer, key, "the server (/v1/models meta)")
            done.append("vocabulary size")
        elif (show := self._post_json("/api/show", {"model": self.model, "verbose": True})) is not None:
            info = show.get("model_info") or {}  # Ollama: no tokenize endpoint, but its GGUF's metadata
            if isinstance(tokens := info.get("tokenizer.ggml.tokens"), list) and tokens:
                same_model.compare_token_strings(tokens, tokenizer, key, "the server (Ollama /api/show)")
                done.append("vocabulary and probe token strings (/api/show)")
            elif sizes := [v for k, v in info.items() if k.endswith(".vocab_size") and isinstance(v, int)]:
                same_model.compare_vocab(sizes[0], tokenizer, key, "the server (Ollama /api/show)")
                done.append("vocabulary size (/api/show)")
        if not done:
            return ("not possible: the server has no tokenize endpoint and reports no vocabulary; make sure it "
                    "serves the configured model, or give backend.options.gguf")
        return "ok: " + ", ".join(done) + " match the run's tokenizer"

    def prepare(self, inputs: BenchInputs) -> dict[str, str]:
        self.tokenizer = inputs.tokenizer
        return {"openai.base_url": self.base_url, "openai.model": str(self.model),
                "engine.model_check": self.model_check}

    def _prompt(self, tokens: list[int]) -> str | list[int]:
        return self.tokenizer.decode(tokens) if self.prompt_format == "text" else tokens

    def _unsupported(self, code: int | None, message: str) -> bool:
        return code in (404, 501) or (code in (None, 400, 422, 500) and bool(NOT_SUPPORTED.search(message)))

    def perplexity(self, windows: torch.Tensor, score_from: list[int] | None = None) -> list[tuple[float, int]] | None:
        out = []
        for window, s in zip(windows.tolist(), score_from or [1] * len(windows), strict=True):
            prompt = self._prompt(window)
            body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1,
                    "temperature": 0}
            try:
                with self._request("/completions", body) as r:
                    answer = json.load(r)
            except urllib.error.HTTPError as exc:  # a server without echo/logprobs support says so here
                message = exc.read().decode("utf-8", errors="replace")
                if self._unsupported(exc.code, message):
                    raise EngineAccuracyUnavailable(f"HTTP {exc.code} from /completions with echo + logprobs: "
                                                    f"{message[:200]}") from None
                raise ServerError(f"HTTP {exc.code} from /completions: {message[:300]}") from None
            if "error" in answer or answer.get("object") == "error":
                if self._unsupported(None, error_text(answer)):
                    raise EngineAccuracyUnavailable(f"/completions with echo + logprobs: {error_text(answer)[:200]}")
                raise ServerError(f"/completions answered an error: {error_text(answer)[:300]}")
            choices = answer.get("choices") or [{}]
            usage = answer.get("usage") or {}
            generated = usage.get("completion_tokens", 1)
            # Token prompts: the ids sent. Text prompts: the server's own count of its tokens.
            count = len(prompt) if isinstance(prompt, list) else usage.get("prompt_tokens")
            # The prompt's characters as echoed: a leading special token (BOS) has no echoed text on llama.cpp's
            # servers, so counting its characters would take the generated token for a prompt token.
            chars = len(self.tokenizer.decode(window, skip_special_tokens=True)) if isinstance(prompt, str) else None
            values = prompt_logprobs(choices[0], count, chars, generated)
            values = values[-(len(window) - s) :] if s > 1 else values  # the scored tail, counted from the end
            out.append((-sum(values), len(values)))
        return out

    def _stream_once(self, prompt: list[int], cfg: BenchConfig, start: float) -> tuple[Timing, dict]:
        body = {"model": self.model, "prompt": self._prompt(prompt), "max_tokens": cfg.output_len,
                "temperature": 0, "stream": True}
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        body |= {k: v for k, v in {"min_tokens": cfg.output_len, "ignore_eos": True}.items() if k in self.force_length}
        timing, usage = Timing(start=start), {}
        try:
            with self._request("/completions", body) as r:
                for chunk in sse_data(r):
                    if is_token_chunk(chunk):
                        timing.token_times.append(now())
                    usage = chunk.get("usage") or usage
        except urllib.error.HTTPError as exc:
            message = exc.read().decode("utf-8", errors="replace")
            if self.include_usage and exc.code in (400, 422) and "stream_options" in message:
                self.include_usage = False  # an older server: count chunks alone
                return self._stream_once(prompt, cfg, now())
            raise ServerError(f"HTTP {exc.code} from /completions (stream): {message[:300]}") from None
        counted = usage.get("completion_tokens", len(timing.token_times))
        if counted != cfg.output_len or len(timing.token_times) != counted:
            raise RuntimeError(f"the server streamed {len(timing.token_times)} token chunks and counted {counted} "
                               f"tokens for max_tokens={cfg.output_len}: it stopped at EOS or packs several tokens "
                               "per chunk; set backend.options.force_length to the fields it honours (min_tokens, "
                               "ignore_eos)")
        return timing, usage

    def _tensors(self, inputs: BenchInputs, cfg: BenchConfig) -> tuple[qbytes.Tensors | None, bool]:
        """(what the served model's decode step reads, whether that is the engine's own count)."""
        if self.gguf is not None:
            return qbytes.from_gguf(self.gguf), True
        weights = cfg.model_bytes or self.meta.get("size")
        if isinstance(weights, int | float):  # one number: the weights, read whole each step; no KV geometry
            source = "bench.model_bytes" if cfg.model_bytes else "the server (/v1/models meta size)"
            return qbytes.Tensors({"weights": float(weights)}, None, None, 0.0, source), True
        if inputs.deployed is not None:
            return dataclasses.replace(inputs.deployed, source="estimate from the qformat's bits per weight "
                                       "(set bench.model_bytes or backend.options.gguf)"), False
        return None, False

    def benchmark(self, inputs: BenchInputs, cfg: BenchConfig) -> tuple[dict[str, float], dict[str, str]]:
        self.tokenizer = inputs.tokenizer
        # Where the server's weights are: "auto" assumes this machine's GPU, if any; an explicit device may be
        # one this process cannot see (a server elsewhere), so it is taken as given.
        device = str(hardware.resolve("auto")) if self.device == "auto" else self.device
        tensors, engines_own = self._tensors(inputs, cfg)
        prompt_tokens: list[int] = []

        def generate_once(prompt: list[int]) -> Timing:
            start = now()
            futures = [pool.submit(self._stream_once, p, cfg, start) for p in variants(prompt, cfg.batch_size)]
            results = [f.result() for f in futures]
            prompt_tokens.extend(u["prompt_tokens"] for _, u in results if isinstance(u.get("prompt_tokens"), int))
            return merge_concurrent([t for t, _ in results])

        with ThreadPoolExecutor(cfg.batch_size) as pool:
            metrics, tags = measure(generate_once, inputs.prompt_tokens, cfg, Target(device, tensors))
        if tensors is not None and engines_own:
            metrics["engine_weight_gib"] = tensors.weight_bytes / 2**30
        if prompt_tokens:  # the server's own count: text prompts are re-tokenized by the server
            metrics["server_prompt_tokens"] = float(statistics.median(prompt_tokens))
        tags |= {"speed_valid": "true", "bench.method": f"OpenAI /completions stream, {cfg.batch_size} concurrent",
                 "bench.usage": "usage (stream_options.include_usage)" if self.include_usage and prompt_tokens
                 else "chunks counted (the server sent no usage)",
                 "roofline.device_assumed": f"{device}: the server's weights are assumed on this machine's {device}"}
        return metrics, tags
