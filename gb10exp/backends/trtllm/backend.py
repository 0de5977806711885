"""TensorRT-LLM's LLM API on the checkpoint modelopt exports: real NVFP4/FP8 kernels, not a simulation.

``prepare`` exports the run's model (``write_checkpoint``, as ``export=true`` does) and loads it with
``tensorrt_llm.LLM`` (weights, autotuning, CUDA graphs: the run's ``startup_s``). Requests stream token ids
greedily with ``ignore_eos``. KV-cache block reuse is off: a repeated prompt must not be answered from the
prefix cache, and context logits (engine perplexity) are only complete without it. TensorRT-LLM runs only on
NVIDIA GPUs, in practice in NVIDIA's container (docs/export_and_support.md, ``install.py``).
tests/test_backend_trtllm.py runs these TensorRT-LLM 1.x calls against a stand-in with the same signatures
(tests/fixtures/tensorrt_llm), so a keyword the real API lacks fails on the CPU too.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import torch

from gb10exp import hardware
from gb10exp.backends import support
from gb10exp.backends.base import Backend, BenchInputs
from gb10exp.backends.trtllm.config import TRTLLMOptions
from gb10exp.bench import Target, Timing, measure, merge_concurrent, now, stamps_from_stream
from gb10exp.config import BenchConfig, ConfigError
from gb10exp.quant import bytes as qbytes
from gb10exp.quant.export import write_checkpoint
from gb10exp.quant.formats import Format
from gb10exp.utils import cache_dir

INSTALL_HINT = ("TensorRT-LLM runs on NVIDIA GPUs inside NVIDIA's container: docker run --gpus all --ipc=host -it "
                "-v $PWD:/work nvcr.io/nvidia/tensorrt-llm/release:<tag>, then pip install -e /work")
NO_CONTEXT_LOGITS = ("not run: TensorRT-LLM returned no context_logits (1.0 can return None), so the engine's "
                     "own perplexity could not be checked against PyTorch's")


def export_checkpoint(inputs: BenchInputs, folder: Path) -> str:
    """The run's model as a checkpoint TensorRT-LLM loads; returns how it was written."""
    ckpt = write_checkpoint(inputs.model, inputs.tokenizer, folder, inputs.quantized)
    return f"{ckpt.method} ({ckpt.quant_algo})" if ckpt.quant_algo else ckpt.method


class TRTLLMBackend(Backend):
    name = "trtllm"
    served_model = None  # runs the configured model (or backend.options.checkpoint, checked as it)
    engine_package = "tensorrt-llm"

    def __init__(self, options: TRTLLMOptions):
        self.checkpoint = Path(options.checkpoint).expanduser() if options.checkpoint else None
        # TensorRT-LLM queues requests beyond its max_batch_size silently, so a bench.batch_size above it
        # would time a queue, not a batch: preflight checks it (gb10exp.backends.check).
        self.free_gpu_memory_fraction, self.max_batch_size = options.free_gpu_memory_fraction, options.max_batch_size
        self.keep_checkpoint = options.keep_checkpoint
        self.llm = None
        self.folder: Path | None = None
        self._exported: Path | None = None
        self.context_logits_missing = False

    def check(self, fmt: Format, tokenizer=None) -> None:
        if fmt.kind == "gguf":
            raise ConfigError(f"qformat={fmt.name!r} is not allowed with backend=trtllm: GGUF formats run on "
                              "backend=llamacpp; TensorRT-LLM runs modelopt formats (nvfp4, fp8, bf16...)")
        try:
            import tensorrt_llm  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install failing on its CUDA libraries
            raise ConfigError(f"backend=trtllm needs tensorrt_llm, which cannot be imported here "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                              f"{INSTALL_HINT}") from exc
        if hardware.resolve("auto").type != "cuda":
            raise ConfigError(f"backend=trtllm needs an NVIDIA GPU and none is visible; {INSTALL_HINT}")
        support.refuse(self.name, fmt, hardware.arch("cuda"))

    def prepare(self, inputs: BenchInputs) -> dict[str, str]:
        import tensorrt_llm
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig

        if self.checkpoint is not None:
            self.folder, how = self.checkpoint, "given by backend.options.checkpoint"
        else:
            self._exported = Path(tempfile.mkdtemp(prefix="export-", dir=cache_dir("trtllm")))
            self.folder, how = self._exported, export_checkpoint(inputs, self._exported)
        kv = KvCacheConfig(enable_block_reuse=False, free_gpu_memory_fraction=self.free_gpu_memory_fraction)
        self.llm = LLM(model=str(self.folder), kv_cache_config=kv, max_batch_size=self.max_batch_size)
        return {"trtllm.checkpoint": how, "trtllm.version": tensorrt_llm.__version__, "speed_valid": "true"}

    def perplexity(self, windows: torch.Tensor, score_from: list[int] | None = None) -> list[tuple[float, int]] | None:
        from tensorrt_llm import SamplingParams

        params = SamplingParams(max_tokens=1, top_k=1, return_context_logits=True, detokenize=False)
        out = []
        starts = score_from or [1] * len(windows)
        for window, s, result in zip(windows.tolist(), starts, self.llm.generate(windows.tolist(), params), strict=True):
            logits = result.context_logits
            if logits is None:
                self.context_logits_missing = True
                return None
            logp = torch.log_softmax(logits[s - 1 : len(window) - 1].float(), dim=-1)
            targets = torch.tensor(window[s:], device=logp.device)
            out.append((-logp.gather(-1, targets[:, None]).sum().item(), len(window) - s))
        return out

    async def _stream(self, prompt: list[int], params, start: float) -> Timing:
        updates: list[tuple[int, float]] = []
        async for output in self.llm.generate_async(prompt, params, streaming=True):
            updates.append((len(output.outputs[0].token_ids), now()))
        return Timing(start=start, token_times=stamps_from_stream(updates))

    async def _concurrent(self, prompts: list[list[int]], params) -> Timing:
        start = now()
        timings = await asyncio.gather(*(self._stream(p, params, start) for p in prompts))
        return merge_concurrent(list(timings))

    def benchmark(self, inputs: BenchInputs, cfg: BenchConfig) -> tuple[dict[str, float], dict[str, str]]:
        from tensorrt_llm import SamplingParams

        params = SamplingParams(max_tokens=cfg.output_len, ignore_eos=True, top_k=1, detokenize=False)

        def generate_once(prompt: list[int]) -> Timing:
            rotated = [prompt[j:] + prompt[:j] for j in range(cfg.batch_size)]  # no shared prefixes
            return asyncio.run(self._concurrent(rotated, params))

        target = Target(str(inputs.device if inputs.device.type == "cuda" else "cuda"),
                        qbytes.from_safetensors(self.folder))
        metrics, tags = measure(generate_once, inputs.prompt_tokens, cfg, target)
        tags |= {"speed_valid": "true", "bench.method": "TensorRT-LLM LLM.generate_async streaming"}
        if self.context_logits_missing:  # engine_accuracy's generic "no engine scoring" would be wrong here
            tags |= {"engine_ppl_check": NO_CONTEXT_LOGITS, "trtllm.context_logits": "missing"}
        return metrics, tags

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        if self._exported is not None and not self.keep_checkpoint:
            shutil.rmtree(self._exported, ignore_errors=True)
