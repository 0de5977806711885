"""Any OpenAI-compatible server over HTTP: Ollama's ``/v1``, ``trtllm-serve``, ``vllm serve``, llama.cpp's
server, llama-cpp-python's server. The server is started by the user; the run only talks to it.

Speed: ``/completions`` with ``stream: true``; TTFT is the arrival of the first streamed token, each
later chunk stamps one token. ``bench.batch_size`` requests are sent concurrently and a step counts as
done when every request has its token. Exact length: ``max_tokens = output_len`` plus the fields in
``options.force_length`` that servers use to ignore EOS; a response with fewer tokens fails the run
rather than timing a shorter answer.

Accuracy: ``echo: true, logprobs: 1, max_tokens: 1`` returns the prompt's token log-probabilities (the
OpenAI convention: entry i is log p(token i | tokens before it)). A server that gets that wrong is
caught by the engine-perplexity check (llama-cpp-python 0.3.36's server returns entry i from the
distribution *after* token i, off by one position).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from gb10exp.backends.base import BenchInputs
from gb10exp.bench import Target, Timing, measure, merge_concurrent, now
from gb10exp.config import BenchConfig, ConfigError, QFormatConfig

PROMPT_FORMATS = ("text", "tokens")
SERVER_HINT = ("start the server first, e.g. python -m llama_cpp.server --model F.gguf, ollama serve, "
               "trtllm-serve DIR, vllm serve MODEL")


def is_token_chunk(chunk: dict) -> bool:
    """A streamed chunk that carries a token: text, or no finish_reason yet (a token whose text is an
    incomplete UTF-8 sequence arrives empty). A closing chunk with empty text and a finish_reason (as
    llama.cpp's servers send) or a usage-only chunk carries none."""
    choices = chunk.get("choices") or []
    if not choices:
        return False
    return bool(choices[0].get("text")) or choices[0].get("finish_reason") is None


def sse_data(lines: Iterator[bytes]) -> Iterator[dict]:
    """The JSON payloads of a server-sent-events stream, up to ``[DONE]``."""
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def prompt_logprobs(choice: dict, prompt_chars: int) -> list[float]:
    """The prompt tokens' log-probabilities from an ``echo`` + ``logprobs`` choice (the first has none)."""
    logprobs = choice.get("logprobs") or {}
    values = logprobs.get("token_logprobs") or []
    offsets = logprobs.get("text_offset") or list(range(len(values)))
    return [v for v, off in zip(values, offsets, strict=False) if off < prompt_chars and v is not None]


class OpenAIBackend:
    name = "openai"

    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", model: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", prompt_format: str = "text",
                 force_length: list[str] | None = None, gguf: str | None = None, device: str = "auto",
                 timeout_s: float = 600.0):
        if prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"backend.options.prompt_format={prompt_format!r} is not allowed: one of {list(PROMPT_FORMATS)}")
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ConfigError(f"backend.options.device={device!r} is not allowed: auto, cpu, cuda or cuda:N")
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.prompt_format, self.gguf, self.device, self.timeout_s = prompt_format, gguf, device, timeout_s
        self.force_length = ["min_tokens", "ignore_eos"] if force_length is None else list(force_length)
        self.tokenizer = None

    # -- HTTP ---------------------------------------------------------------------------------------
    def _request(self, path: str, body: dict | None = None, timeout: float | None = None):
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get(self.api_key_env):  # read at request time, never stored or logged
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        return urllib.request.urlopen(req, timeout=timeout or self.timeout_s)

    def check(self, qformat: QFormatConfig) -> None:
        try:
            with self._request("/models", timeout=10) as r:
                served = [m["id"] for m in json.load(r).get("data", [])]
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ConfigError(f"backend.options.base_url={self.base_url!r} cannot be reached "
                              f"({getattr(exc, 'reason', exc)}); {SERVER_HINT}") from exc
        if self.model is None:
            if not served:
                raise ConfigError(f"backend.options.model=None is not allowed: {self.base_url}/models lists no model")
            self.model = served[0]
        elif served and self.model not in served:
            raise ConfigError(f"backend.options.model={self.model!r} is not allowed: the server has {served}")

    def prepare(self, inputs: BenchInputs) -> dict[str, str]:
        self.tokenizer = inputs.tokenizer
        return {"openai.base_url": self.base_url, "openai.model": str(self.model)}

    def close(self) -> None:
        pass

    def _prompt(self, tokens: list[int]) -> str | list[int]:
        return self.tokenizer.decode(tokens) if self.prompt_format == "text" else tokens

    # -- accuracy -----------------------------------------------------------------------------------
    def perplexity(self, windows: torch.Tensor, score_from: list[int] | None = None) -> list[tuple[float, int]] | None:
        out = []
        for window, s in zip(windows.tolist(), score_from or [1] * len(windows), strict=True):
            prompt = self._prompt(window)
            body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1,
                    "temperature": 0}
            try:
                with self._request("/completions", body) as r:
                    choice = json.load(r)["choices"][0]
            except urllib.error.HTTPError as exc:  # a server without echo/logprobs support says so here
                if exc.code in (400, 404, 422, 501):
                    return None
                raise
            chars = len(prompt) if isinstance(prompt, str) else float("inf")
            values = prompt_logprobs(choice, chars)
            if not values:
                return None
            values = values[-(len(window) - s) :] if s > 1 else values  # the scored tail, counted from the end
            out.append((-sum(values), len(values)))
        return out

    # -- speed --------------------------------------------------------------------------------------
    def _stream_once(self, prompt: list[int], cfg: BenchConfig, start: float) -> Timing:
        body = {"model": self.model, "prompt": self._prompt(prompt), "max_tokens": cfg.output_len,
                "temperature": 0, "stream": True}
        body |= {k: v for k, v in {"min_tokens": cfg.output_len, "ignore_eos": True}.items() if k in self.force_length}
        timing = Timing(start=start)
        with self._request("/completions", body) as r:
            for chunk in sse_data(r):
                if is_token_chunk(chunk):
                    timing.token_times.append(now())
        if len(timing.token_times) != cfg.output_len:
            raise RuntimeError(f"the server streamed {len(timing.token_times)} tokens for max_tokens={cfg.output_len}: "
                               "it stopped at EOS or batches tokens per chunk; set backend.options.force_length to "
                               "the fields it honours (min_tokens, ignore_eos)")
        return timing

    def _decode_bytes(self, inputs: BenchInputs) -> tuple[float, str]:
        if self.gguf:
            from gb10exp.backends.llamacpp.gguf import decode_bytes

            return decode_bytes(Path(self.gguf).expanduser()), "the served GGUF file"
        return inputs.weight_bytes, "estimate from the qformat's bits per weight (set backend.options.gguf for GGUF)"

    def benchmark(self, inputs: BenchInputs, cfg: BenchConfig) -> tuple[dict[str, float], dict[str, str]]:
        self.tokenizer = inputs.tokenizer
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        bytes_, source = self._decode_bytes(inputs)
        pool = ThreadPoolExecutor(cfg.batch_size)

        def generate_once(prompt: list[int]) -> Timing:
            # Concurrent requests start at different tokens (a rotation): none can reuse another's prefix.
            rotated = [prompt[j:] + prompt[:j] for j in range(cfg.batch_size)]
            start = now()
            futures = [pool.submit(self._stream_once, r, cfg, start) for r in rotated]
            return merge_concurrent([f.result() for f in futures])

        try:
            metrics, tags = measure(generate_once, inputs.prompt_tokens, cfg, Target(device, bytes_))
        finally:
            pool.shutdown()
        if self.gguf:  # the deployed weights are the served file's, not the 16-bit estimate
            metrics["weight_gib"] = Path(self.gguf).expanduser().stat().st_size / 2**30
        tags |= {"speed_valid": "true", "bench.method": f"OpenAI /completions stream, {cfg.batch_size} concurrent",
                 "roofline.bytes_source": source,
                 "roofline.device_assumed": f"{device}: the server's weights are assumed on this machine's {device}"}
        return metrics, tags
