"""llama.cpp in-process through llama-cpp-python, on a GGUF file: the seed's Ollama baseline.

The GGUF is the configured model in the qformat's ``gguf_type`` (``qformat=gguf_q4_k_m``), built once by
``gguf.py``; an unquantized qformat (``bf16``) runs as F16; ``options.gguf`` runs a given file instead.
Where a CUDA GPU is present every layer is offloaded to it (``n_gpu_layers=-1``) and the run says so; a
llama.cpp built without GPU support refuses to run there rather than silently timing the CPU
(``options.allow_cpu=true`` accepts it). Perplexity is computed by llama.cpp itself from its logits over
the same evaluation token ids that PyTorch scored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gb10exp.backends.base import BenchInputs
from gb10exp.bench import Target, Timing, measure, now
from gb10exp.config import BenchConfig, ConfigError, QFormatConfig

INSTALL_HINT = ("pip install 'llama-cpp-python[server]==0.3.*' (compiles llama.cpp, ~11 min on 2 cores; on a GPU "
                "machine add CMAKE_ARGS=-DGGML_CUDA=on)")


def _gguf_type(qformat: QFormatConfig) -> str | None:
    if qformat.gguf_type is not None:
        return qformat.gguf_type
    return "F16" if qformat.kind == "none" else None


def _log_softmax_nll(scores: np.ndarray, targets: np.ndarray) -> float:
    """Summed -log p(target) over rows of logits (float64 for a stable log-sum-exp)."""
    logits = scores.astype(np.float64)
    peak = logits.max(axis=1, keepdims=True)
    log_z = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
    return float((log_z - logits[np.arange(len(targets)), targets]).sum())


class LlamaCppBackend:
    name = "llamacpp"
    max_batch_size = 1  # llama-cpp-python runs one sequence (preflight checks bench.batch_size against it)

    def __init__(self, gguf: str | None = None, n_gpu_layers: int = -1, n_threads: int | None = None,
                 allow_cpu: bool = False):
        self.gguf = Path(gguf).expanduser() if gguf else None
        self.n_gpu_layers, self.n_threads, self.allow_cpu = n_gpu_layers, n_threads, allow_cpu
        self.path: Path | None = None
        self.on_gpu = False

    def check(self, qformat: QFormatConfig) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise ConfigError(f"backend=llamacpp needs llama-cpp-python, which is not installed: {INSTALL_HINT}") from exc
        if self.gguf is None and _gguf_type(qformat) is None:
            raise ConfigError(f"qformat={qformat.name!r} is not allowed with backend=llamacpp: llama.cpp runs GGUF "
                              "types (qformat=gguf_q4_k_m, or bf16 as F16); or give backend.options.gguf=FILE")
        if self.gguf is not None and not self.gguf.is_file():
            raise ConfigError(f"backend.options.gguf={str(self.gguf)!r} is not allowed: no such file")
        self.on_gpu = torch.cuda.is_available() and self.n_gpu_layers != 0
        if self.on_gpu and not llama_cpp.llama_supports_gpu_offload() and not self.allow_cpu:
            raise ConfigError("backend=llamacpp: a CUDA GPU is present but this llama-cpp-python was built without "
                              "GPU support, so it would time the CPU; reinstall with CMAKE_ARGS=-DGGML_CUDA=on "
                              "pip install --force-reinstall --no-cache-dir llama-cpp-python, or set "
                              "backend.options.allow_cpu=true")
        self.on_gpu = self.on_gpu and llama_cpp.llama_supports_gpu_offload()

    def prepare(self, inputs: BenchInputs) -> dict[str, str]:
        from gb10exp.backends.llamacpp.gguf import build_gguf

        if self.gguf is not None:
            self.path, origin = self.gguf, "given by backend.options.gguf"
        else:
            gguf_type = _gguf_type(inputs.qformat)
            self.path, origin = build_gguf(inputs.model_cfg, gguf_type, inputs.model, inputs.tokenizer)
        return {"gguf.file": str(self.path), "gguf.origin": origin}

    def _load(self, n_ctx: int, logits_all: bool):
        import llama_cpp

        return llama_cpp.Llama(str(self.path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                               n_gpu_layers=self.n_gpu_layers if self.on_gpu else 0, n_threads=self.n_threads,
                               verbose=False)

    def _offload_tag(self, llm) -> str:
        import llama_cpp

        layers = llama_cpp.llama_model_n_layer(llm._model.model)
        if not self.on_gpu:
            return f"none: CPU only ({'no GPU present' if not torch.cuda.is_available() else 'allow_cpu=true'})"
        offloaded = layers if self.n_gpu_layers < 0 else min(self.n_gpu_layers, layers)
        return f"{'all ' if offloaded == layers else ''}{offloaded}/{layers} layers on the GPU (+ output layer)"

    def perplexity(self, windows: torch.Tensor, score_from: list[int] | None = None) -> list[tuple[float, int]] | None:
        llm = self._load(windows.shape[1], logits_all=True)
        try:
            out = []
            for window, s in zip(windows.tolist(), score_from or [1] * len(windows), strict=True):
                llm.reset()  # position 0, empty KV cache: each window scored on its own, as PyTorch did
                llm.eval(window)
                out.append((_log_softmax_nll(llm.scores[s - 1 : len(window) - 1], np.asarray(window[s:])), len(window) - s))
            return out
        finally:
            llm.close()

    def benchmark(self, inputs: BenchInputs, cfg: BenchConfig) -> tuple[dict[str, float], dict[str, str]]:
        import llama_cpp

        from gb10exp.backends.llamacpp.gguf import decode_bytes

        if cfg.batch_size != 1:
            raise ConfigError(f"bench.batch_size={cfg.batch_size} is not allowed with backend=llamacpp: "
                              "llama-cpp-python runs one sequence; use backend=openai on llama.cpp's server for "
                              "concurrent requests")
        start = now()
        llm = self._load(cfg.input_len + cfg.output_len, logits_all=False)
        load_s = now() - start

        def generate_once(prompt: list[int]) -> Timing:
            llm.reset()  # no prefix reuse between requests
            timing = Timing(start=now())
            tokens = llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
            for _ in tokens:  # llama.cpp's raw generator never stops at EOS: exactly output_len tokens
                timing.token_times.append(now())
                if len(timing.token_times) == cfg.output_len:
                    break
            tokens.close()
            return timing

        weights = float(llama_cpp.llama_model_size(llm._model.model))
        target = Target("cuda" if self.on_gpu else "cpu", decode_bytes(self.path),
                        peak_bytes=lambda: weights + llama_cpp.llama_state_get_size(llm._ctx.ctx))
        try:
            metrics, tags = measure(generate_once, inputs.prompt_tokens, cfg, target)
            tags |= {"speed_valid": "true", "bench.method": "llama.cpp generate", "llamacpp.offload": self._offload_tag(llm)}
        finally:
            llm.close()  # frees the model and context now, not whenever the garbage collector runs
        # The deployed weights are the GGUF's, not the PyTorch model's 16-bit estimate.
        gguf_bytes = float(self.path.stat().st_size)
        return metrics | {"engine_load_s": load_s, "gguf_bytes": gguf_bytes, "weight_gib": gguf_bytes / 2**30}, tags

    def close(self) -> None:
        pass
