"""llama.cpp through llama-cpp-python, on a GGUF file: the seed's Ollama baseline, and NVFP4 as deployed.

The GGUF is built once by ``gguf.py`` (from the model, or from the run's modelopt export), or given as
``options.gguf`` (its vocabulary checked against the run's tokenizer, ``same_model.py``). The engine's logits
over the evaluation windows are scored as PyTorch's are: perplexity, KL and top-1 from llama.cpp's own
kernels. llama.cpp runs in a child process (``worker.py``): a native crash fails this run, not the sweep. With
a CUDA GPU every layer is offloaded (``n_gpu_layers=-1``); a build without GPU support refuses to time the CPU
there (``options.allow_cpu=true`` accepts it). CPU buffer types: ``loader.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from gb10exp import hardware
from gb10exp.backends.base import Backend, BenchInputs
from gb10exp.backends.llamacpp.config import LlamaCppOptions
from gb10exp.backends.llamacpp.gguf import build_gguf, convertible, deploy
from gb10exp.backends.llamacpp.loader import describe as describe_bufts
from gb10exp.backends.llamacpp.loader import use_extra_bufts
from gb10exp.backends.llamacpp.worker import Engine
from gb10exp.backends.same_model import check_gguf
from gb10exp.bench import Target, Timing, measure, now
from gb10exp.config import BenchConfig, ConfigError
from gb10exp.quant import bytes as qbytes
from gb10exp.quant.formats import Format

INSTALL_HINT = ("pip install 'llama-cpp-python[server]==0.3.*' (compiles llama.cpp, ~11 min on 2 cores; on a GPU "
                "machine add CMAKE_ARGS=-DGGML_CUDA=on)")


class LlamaCppBackend(Backend):
    name = "llamacpp"
    max_batch_size = 1  # llama-cpp-python runs one sequence (preflight checks bench.batch_size against it)
    engine_package = "llama-cpp-python"
    returns_logits = True  # llama.cpp's scores: whole windows, every position

    def __init__(self, options: LlamaCppOptions):
        self.extra_bufts = use_extra_bufts(options.extra_bufts)
        self.extra_bufts_tag = describe_bufts(self.extra_bufts, options.extra_bufts)
        self.gguf = Path(options.gguf).expanduser() if options.gguf else None
        self.n_gpu_layers, self.n_threads, self.allow_cpu = options.n_gpu_layers, options.n_threads, options.allow_cpu
        self.path: Path | None = None
        self.on_gpu = False
        self.served_model: str | None = None  # the given GGUF's model name (options.gguf)
        self.model_check = ""
        self.engine: Engine | None = None
        self.loaded: tuple[int, bool] | None = None
        self.info: dict = {}

    def check(self, fmt: Format, tokenizer=None) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise ConfigError(f"backend=llamacpp needs llama-cpp-python, which is not installed: {INSTALL_HINT}") from exc
        if self.gguf is None and fmt.modelopt and (why := convertible(fmt)) is not None:
            raise ConfigError(f"qformat={fmt.name!r} is not allowed with backend=llamacpp: {why}; llama.cpp runs "
                              "nvfp4, nvfp4_wo, the NVFP4 recipes that export as NVFP4, fp8 (as F16), its own GGUF "
                              "types (gguf_q4_k_m, gguf_nvfp4) and bf16, or a given backend.options.gguf=FILE")
        if self.gguf is not None:
            key = f"backend.options.gguf={str(self.gguf)!r}"
            self.served_model, self.model_check = check_gguf(self.gguf, tokenizer, key)
        self.on_gpu = hardware.resolve("auto").type == "cuda" and self.n_gpu_layers != 0
        if self.on_gpu and not llama_cpp.llama_supports_gpu_offload() and not self.allow_cpu:
            raise ConfigError("backend=llamacpp: a CUDA GPU is present but this llama-cpp-python was built without "
                              "GPU support, so it would time the CPU; reinstall with CMAKE_ARGS=-DGGML_CUDA=on "
                              "pip install --force-reinstall --no-cache-dir llama-cpp-python, or set "
                              "backend.options.allow_cpu=true")
        self.on_gpu = self.on_gpu and llama_cpp.llama_supports_gpu_offload()

    def prepare(self, inputs: BenchInputs) -> dict[str, str]:
        if self.gguf is not None:
            self.path, origin = self.gguf, "given by backend.options.gguf"
        elif inputs.fmt.modelopt:
            self.path, origin = deploy(inputs.model, inputs.tokenizer, inputs.fmt, inputs.cache_key)
        else:
            fmt = inputs.fmt
            gguf_type = fmt.gguf_type if fmt.gguf_type is not None else "F16" if fmt.kind == "none" else None
            self.path, origin = build_gguf(inputs.model_cfg, gguf_type, inputs.model, inputs.tokenizer)
        tags = {"gguf.file": str(self.path), "gguf.origin": origin,
                "llamacpp.extra_bufts": self.extra_bufts_tag}
        return tags | ({"engine.model_check": self.model_check} if self.model_check else {})

    def _load(self, n_ctx: int, logits_all: bool) -> Engine:
        """The child process with the model loaded for this context size (reloaded only when it changes)."""
        self.engine = self.engine or Engine()
        if self.loaded != (n_ctx, logits_all):
            self.info = self.engine.call("load", path=str(self.path), n_ctx=n_ctx, logits_all=logits_all,
                                         n_gpu_layers=self.n_gpu_layers if self.on_gpu else 0,
                                         n_threads=self.threads(), extra_bufts=self.extra_bufts)
            self.loaded = (n_ctx, logits_all)
            self.info["kernels"] = kernels(self.engine.log_path.read_text(errors="replace"))
        return self.engine

    def threads(self) -> int:
        """options.n_threads, else the cores this process may run on: llama-cpp-python's own default
        (cpu_count() // 2) ignores CPU affinity and oversubscribes a container's few cores many times."""
        return self.n_threads or len(os.sched_getaffinity(0))

    def _offload_tag(self) -> str:
        layers = self.info["n_layer"]
        if not self.on_gpu:
            gpu = hardware.resolve("auto").type == "cuda"
            return f"none: CPU only ({'allow_cpu=true' if gpu else 'no GPU present'})"
        offloaded = layers if self.n_gpu_layers < 0 else min(self.n_gpu_layers, layers)
        return f"{'all ' if offloaded == layers else ''}{offloaded}/{layers} layers on the GPU (+ output layer)"

    def logits(self, windows: torch.Tensor) -> torch.Tensor:
        """llama.cpp's logits at every position of every window (N, T, vocabulary), float32."""
        import numpy as np

        engine = self._load(windows.shape[1], logits_all=True)
        out = []
        for window in windows.tolist():
            path = engine.log_path.with_name(f"logits-{len(out)}.npy")
            engine.call("logits", window=window, out=str(path))
            out.append(torch.from_numpy(np.load(path)))
            path.unlink()
        return torch.stack(out)

    def describe(self) -> dict[str, str]:
        return {f"llamacpp.{k}": v for k, v in self.info.get("kernels", {}).items()} | {
            "llamacpp.offload": self._offload_tag()} if self.info else {}

    def perplexity(self, windows: torch.Tensor, score_from: list[int] | None = None) -> list[tuple[float, int]] | None:
        engine = self._load(windows.shape[1], logits_all=True)
        starts = score_from or [1] * len(windows)
        return [(r["nll"], r["tokens"]) for r in (engine.call("nll", window=w, score_from=s)
                                                  for w, s in zip(windows.tolist(), starts, strict=True))]

    def benchmark(self, inputs: BenchInputs, cfg: BenchConfig) -> tuple[dict[str, float], dict[str, str]]:
        start = now()
        engine = self._load(cfg.depth + cfg.input_len + cfg.output_len, logits_all=False)
        load_s = now() - start

        def generate_once(prompt: list[int]) -> Timing:
            got = engine.call("generate", prompt=prompt, depth=cfg.depth, output_len=cfg.output_len)
            return Timing(start=got["start"], token_times=got["token_times"])

        peak = float(self.info["model_bytes"] + self.info["state_bytes"])
        target = Target("cuda" if self.on_gpu else "cpu", qbytes.from_gguf(self.path), peak_bytes=lambda: peak,
                        depth_untimed=True)
        metrics, tags = measure(generate_once, inputs.prompt_tokens, cfg, target)
        tags |= self.describe() | {"speed_valid": "true", "bench.method": "llama.cpp generate (child process)",
                                      "llamacpp.threads": str(self.threads())}
        # What llama.cpp really runs: the GGUF's tensors (weight_gib stays the format's deployed count).
        return metrics | {"engine_load_s": load_s, "engine_weight_gib": self.info["model_bytes"] / 2**30}, tags

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine, self.loaded = None, None


def kernels(log: str) -> dict[str, str]:
    """What llama.cpp used, from its load log (llama-cpp-python verbose): ``backend`` (the devices the layers
    went to: CPU, CUDA0...), ``buffers`` (model buffer types: CPU_Mapped, AMX, CPU_REPACK, CUDA0...),
    ``tensor_types`` (count per GGUF type, e.g. "nvfp4 210, f32 61, f16 1"), ``cpu_features`` (what the build
    may use on this CPU, its system-info line) and ``file_type``."""
    out: dict[str, str] = {}
    if types := re.findall(r"llama_model_loader: - type\s+(\w+):\s+(\d+) tensors", log):
        out["tensor_types"] = ", ".join(f"{t} {n}" for t, n in sorted(types, key=lambda x: -int(x[1])))
    if buffers := sorted(set(re.findall(r"load_tensors:\s+(\S+) model buffer size", log))):
        out["buffers"] = ", ".join(buffers)
        out["backend"] = ", ".join(sorted({"CPU" if b.startswith(("CPU", "AMX")) else b for b in buffers}))
    if found := re.search(r"^CPU : (.*)$", log, re.MULTILINE):
        out["cpu_features"] = " ".join(f.split(" = ")[0] for f in found.group(1).split(" | ") if f.endswith("= 1"))
    if found := re.search(r"print_info: file type\s+= (.*)$", log, re.MULTILINE):
        out["file_type"] = found.group(1).strip()
    return out
