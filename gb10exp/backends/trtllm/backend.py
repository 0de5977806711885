"""TensorRT-LLM's LLM API on the checkpoint modelopt exports: real NVFP4/FP8 kernels, not a simulation.

``prepare`` writes the run's model as a Hugging Face checkpoint (``export_hf_checkpoint`` for a
modelopt-quantized model, ``save_pretrained`` otherwise) and loads it with ``tensorrt_llm.LLM``; that
load (weights, kernel autotuning, CUDA-graph capture) is the run's ``startup_s``, never part of a
request. Requests go through ``generate_async(..., streaming=True)`` with token ids in, greedy
sampling, ``ignore_eos`` and ``max_tokens = output_len``; each streamed update stamps its new tokens.
KV-cache block reuse is off: a repeated prompt must not be answered from the prefix cache, and context
logits (engine perplexity) are only complete without it.

TensorRT-LLM runs only on NVIDIA GPUs, in practice inside NVIDIA's container; where it cannot be
imported the run fails in one line saying how to get it. Written from TensorRT-LLM's documented LLM API
(``LLM``, ``SamplingParams``, ``KvCacheConfig``, ``RequestOutput``); not run on the CPU machines.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import torch

from gb10exp.backends.base import BenchInputs
from gb10exp.bench import Target, Timing, measure, merge_concurrent, now, stamps_from_stream
from gb10exp.config import BenchConfig, ConfigError, QFormatConfig
from gb10exp.utils import cache_dir

INSTALL_HINT = ("TensorRT-LLM runs on NVIDIA GPUs inside NVIDIA's container: docker run --gpus all --ipc=host -it "
                "-v $PWD:/work nvcr.io/nvidia/tensorrt-llm/release:<tag>, then pip install -e /work")
# safetensors dtype names -> bytes per element (packed FP4 is stored as U8, two values a byte)
DTYPE_BYTES = {"F64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "I64": 8,
               "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1, "BOOL": 1}


def checkpoint_decode_bytes(folder: Path) -> float:
    """Bytes one decode step reads from a safetensors checkpoint: every tensor, except an input
    embedding table that has a separate output head (one row of it is read per token)."""
    sizes: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:  # the header alone: no tensor is loaded
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                sizes[name] = count * DTYPE_BYTES.get(info["dtype"], 2)
    total = sum(sizes.values())
    if any(n.endswith("lm_head.weight") for n in sizes):
        total -= sum(v for n, v in sizes.items() if n.endswith("embed_tokens.weight"))
    return float(total)


def export_checkpoint(inputs: BenchInputs, folder: Path) -> str:
    """The run's model as a checkpoint TensorRT-LLM loads; returns how it was written."""
    model = inputs.model
    if getattr(model.config, "architectures", None) is None:  # export fails on models built in code
        model.config.architectures = [type(model).__name__]
    if inputs.quantized:
        from modelopt.torch.export import export_hf_checkpoint

        export_hf_checkpoint(model, export_dir=str(folder))
        how = "modelopt export_hf_checkpoint (real quantized weights)"
    else:
        model.save_pretrained(str(folder))
        how = "save_pretrained (unquantized)"
    inputs.tokenizer.save_pretrained(str(folder))
    return how


class TRTLLMBackend:
    name = "trtllm"

    def __init__(self, checkpoint: str | None = None, free_gpu_memory_fraction: float = 0.5,
                 max_batch_size: int = 8, keep_checkpoint: bool = False):
        self.checkpoint = Path(checkpoint).expanduser() if checkpoint else None
        self.free_gpu_memory_fraction, self.max_batch_size = free_gpu_memory_fraction, max_batch_size
        self.keep_checkpoint = keep_checkpoint
        self.llm = None
        self.folder: Path | None = None
        self._exported: Path | None = None

    def check(self, qformat: QFormatConfig, tokenizer=None) -> None:
        if qformat.gguf_type is not None:
            raise ConfigError(f"qformat={qformat.name!r} is not allowed with backend=trtllm: GGUF formats run on "
                              "backend=llamacpp; TensorRT-LLM runs modelopt formats (nvfp4, fp8, bf16...)")
        try:
            import tensorrt_llm  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install failing on its CUDA libraries
            raise ConfigError(f"backend=trtllm needs tensorrt_llm, which cannot be imported here "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                              f"{INSTALL_HINT}") from exc
        if not torch.cuda.is_available():
            raise ConfigError(f"backend=trtllm needs an NVIDIA GPU and none is visible; {INSTALL_HINT}")

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

    def perplexity(self, windows: torch.Tensor) -> list[tuple[float, int]] | None:
        from tensorrt_llm import SamplingParams

        params = SamplingParams(max_tokens=1, top_k=1, return_context_logits=True, detokenize=False)
        out = []
        for window, result in zip(windows.tolist(), self.llm.generate(windows.tolist(), params), strict=True):
            logits = result.context_logits
            if logits is None:
                return None
            logp = torch.log_softmax(logits[: len(window) - 1].float(), dim=-1)
            targets = torch.tensor(window[1:], device=logp.device)
            out.append((-logp.gather(-1, targets[:, None]).sum().item(), len(window) - 1))
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
                        checkpoint_decode_bytes(self.folder))
        metrics, tags = measure(generate_once, inputs.prompt_tokens, cfg, target)
        return metrics, tags | {"speed_valid": "true", "bench.method": "TensorRT-LLM LLM.generate_async streaming"}

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        if self._exported is not None and not self.keep_checkpoint:
            shutil.rmtree(self._exported, ignore_errors=True)
