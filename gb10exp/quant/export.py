"""The deployable checkpoint: modelopt's unified Hugging Face export of the run's quantized model.

``export=true`` writes it to ``<job output dir>/checkpoint`` (``export_dir=PATH`` elsewhere): ``config.json``
(with ``quantization_config``), ``hf_quant_config.json`` and ``model.safetensors`` holding the real quantized
weights (NVFP4: packed U8 values, F8_E4M3 block scales, F32 ``weight_scale_2`` / ``input_scale``), plus the
tokenizer. This is what ``trtllm-serve`` and ``vllm serve`` load; the TensorRT-LLM backend exports with the
same function.

Three modelopt 0.47 quirks are handled here, once:
- without an explicit ``dtype`` every 4-bit format fails with "Invalid device string: 'bfloat16'"
  (transformers 5 keeps ``config.dtype`` as a string, which modelopt passes to ``Tensor.to``);
- a config built in code has ``architectures = None`` and the export fails on it;
- the export replaces the weights in place (packed, no longer usable by the fake-quantized forward), so it
  is the last thing done with the model, and a second export of the same model copies the first one.
On the CPU the model computes in float32; its unquantized tensors (embeddings, norms, an excluded lm_head)
are rewritten in bfloat16 as on a GPU, so the checkpoint has the same deployable size everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gb10exp.config import Config, ConfigError
from gb10exp.quant import formats
from gb10exp.quant.bytes import safetensors_header
from gb10exp.quant.formats import Format
from gb10exp.quant.nvfp4_cpu import cpu_nvfp4
from gb10exp.utils import check_writable

log = logging.getLogger(__name__)

# vLLM's --quantization name per hf_quant_config quant_algo (vllm/model_executor/layers/quantization/modelopt.py:
# ModelOptFp8Config.get_name "modelopt", ModelOptNvFp4Config.get_name "modelopt_fp4",
# ModelOptMixedPrecisionConfig.get_name "modelopt_mixed"); vLLM also detects it from hf_quant_config.json.
VLLM_QUANTIZATION = {"FP8": "modelopt", "NVFP4": "modelopt_fp4", "W4A16_NVFP4": "modelopt_fp4",
                     "MIXED_PRECISION": "modelopt_mixed"}
_EXPORTED = "_gb10exp_exported_to"  # attribute marking a model whose weights the export already packed


@dataclass
class Checkpoint:
    """What was written: the folder, its size, and the quantization it declares."""

    path: Path
    method: str  # "modelopt export_hf_checkpoint" | "save_pretrained (unquantized)"
    file_bytes: int  # every file in the folder
    tensor_bytes: int  # the safetensors tensors alone
    hf_quant_config: dict[str, Any] | None
    dtypes: dict[str, int] = field(default_factory=dict)  # safetensors dtype -> tensor count

    @property
    def quant_algo(self) -> str | None:
        return (self.hf_quant_config or {}).get("quantization", {}).get("quant_algo")

    def tags(self) -> dict[str, str]:
        return {"export.path": str(self.path), "export.method": self.method,
                "export.quant_algo": self.quant_algo or "none",
                "export.dtypes": ", ".join(f"{k}:{v}" for k, v in sorted(self.dtypes.items()))}

    def metrics(self) -> dict[str, float]:
        return {"export_gib": self.file_bytes / 2**30, "export_tensor_gib": self.tensor_bytes / 2**30}


def _linear_inputs(arch: dict[str, Any]) -> dict[str, int]:
    """Input widths of a Llama-style model's linear layers, from its LlamaConfig keywords."""
    hidden = int(arch.get("hidden_size", 4096))
    heads = int(arch.get("num_attention_heads", 32))
    head_dim = int(arch.get("head_dim") or hidden // heads)
    return {"hidden_size (q/k/v/gate/up inputs)": hidden,
            "num_attention_heads*head_dim (o_proj input)": heads * head_dim,
            "intermediate_size (down_proj input)": int(arch.get("intermediate_size", 11008))}


def _block_error(fmt: Format, block: int, what: str, width: int) -> ConfigError:
    return ConfigError(f"export=true is not allowed with qformat={fmt.name!r} on this model: {what} = "
                       f"{width} is not a multiple of the format's weight block size {block} (modelopt packs "
                       "whole blocks only); export fp8 or an NVFP4 format instead, or drop export=true")


def check(cfg: Config) -> None:
    """Preflight, per job: refuse an export that cannot work, in one line, before any work."""
    if not cfg.export:
        return
    if cfg.export_dir is not None:
        check_writable(cfg.export_dir, "export_dir")
    fmt = formats.of(cfg.qformat, cfg.kv_cache_qformat)
    if fmt.kind == "gguf":
        raise ConfigError(f"export=true is not allowed with qformat={fmt.name!r}: it exports modelopt "
                          f"checkpoints, and {fmt.gguf_type} is made by llama.cpp's quantizer "
                          "(backend=llamacpp builds and caches that GGUF file); pick a modelopt format "
                          "(fp8, nvfp4, int4_awq...) or bf16")
    if fmt.kind != "modelopt" or cfg.model.source != "random":
        return  # other models' widths are known once loaded: check_model does it before quantizing
    for what, width in _linear_inputs(cfg.model.arch).items():
        if fmt.weight_block and width % fmt.weight_block:
            raise _block_error(fmt, fmt.weight_block, what, width)


def check_model(model: torch.nn.Module, cfg: Config) -> None:
    """The same block-size check on a loaded model, before quantization spends any time."""
    fmt = formats.of(cfg.qformat, cfg.kv_cache_qformat)
    if not cfg.export or fmt.kind != "modelopt" or not fmt.weight_block:
        return
    for name, module in model.named_modules():
        # lm_head stays unquantized in every modelopt config gb10exp uses ("*lm_head*" disabled)
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name and module.in_features % fmt.weight_block:
            raise _block_error(fmt, fmt.weight_block, f"{name}.in_features", module.in_features)


SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale",
                  "output_scale")


def _downcast_unquantized(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite float32 tensors that are not scales (embeddings, norms, an unquantized lm_head) in ``dtype``.
    Only a float32 model (the CPU) needs it; it is done on the files because the export itself runs the
    model, which must stay in one dtype until then. Scales keep float32: they were calibrated in it."""
    name = str(dtype).removeprefix("torch.")
    for file in sorted(folder.glob("*.safetensors")):
        _downcast_file(file, dtype)
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # its total_size must match the rewritten shards
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = _tensor_bytes(folder)[0]
        index.write_text(json.dumps(data, indent=2))
    config = folder / "config.json"
    data = json.loads(config.read_text())
    data["dtype"] = name
    config.write_text(json.dumps(data, indent=2))


def offloaded(model: torch.nn.Module) -> bool:
    """Some of the model's modules keep their weights on disk (``quant.offload_dir``: accelerate hooks)."""
    return "disk" in getattr(model, "hf_device_map", {}).values()


def _shard_size(model: torch.nn.Module) -> str:
    """modelopt's streaming export (what it does for an offloaded model) buffers a whole shard before writing
    it: shards of two decoder layers (100 MB at least) keep that buffer near the one layer it materializes."""
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    layers = LayerActivationCollector.get_decoder_layers(model)
    layer = sum(p.numel() * p.element_size() for p in layers[0].parameters()) if layers else 0
    return f"{max(2 * layer, 100 * 10**6) // 10**6}MB"


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16"}


def _downcast_file(file: Path, dtype: torch.dtype) -> None:
    """``_downcast_unquantized`` for one file, one tensor in memory at a time (a shard of a model larger than
    memory must not be loaded whole): the safetensors layout (8-byte header length, JSON header, data) is
    written directly, tensors in their original order, then the file is replaced."""
    from safetensors import safe_open

    header = safetensors_header(file)
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    keys = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    down = {k for k in keys if header[k]["dtype"] == "F32" and not k.endswith(SCALE_SUFFIXES)}
    table: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in keys:
        start, end = header[key]["data_offsets"]
        size = (end - start) // 4 * dtype.itemsize if key in down else end - start
        table[key] = {"dtype": SAFETENSORS_DTYPES[dtype] if key in down else header[key]["dtype"],
                      "shape": header[key]["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(table, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as out, safe_open(str(file), "pt", backend="pread") as f:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        for key in keys:
            tensor = f.get_tensor(key)
            tensor = tensor.to(dtype) if key in down else tensor
            out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, file)


def write_checkpoint(model: torch.nn.Module, tokenizer: Any, folder: Path, quantized: bool) -> Checkpoint:
    """Write ``model`` (modelopt-quantized or not) as a Hugging Face checkpoint in ``folder``. The export
    packs the quantized weights in place: afterwards ``model`` can only be exported again (which copies
    this folder), not run."""
    folder = Path(folder)
    if (previous := getattr(model, _EXPORTED, None)) is not None:
        if Path(previous).resolve() != folder.resolve():
            shutil.copytree(previous, folder, dirs_exist_ok=True)
        return summarize(folder, method=getattr(model, _EXPORTED + "_method"))
    folder.mkdir(parents=True, exist_ok=True)
    if getattr(model.config, "architectures", None) is None:  # a config built in code: export fails on None
        model.config.architectures = [type(model).__name__]
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if quantized:
        from modelopt.torch.export import export_hf_checkpoint

        shards = {"max_shard_size": _shard_size(model)} if offloaded(model) else {}
        with cpu_nvfp4():  # NVFP4 on the CPU: modelopt's own numerics through the project's adapter
            export_hf_checkpoint(model, dtype=dtype, export_dir=str(folder), **shards)
        method = "modelopt export_hf_checkpoint"
    else:
        model.save_pretrained(str(folder))
        method = "save_pretrained (unquantized)"
    if next(model.parameters()).dtype == torch.float32:
        _downcast_unquantized(folder, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    setattr(model, _EXPORTED, str(folder))
    setattr(model, _EXPORTED + "_method", method)
    return summarize(folder, method)


def _tensor_bytes(folder: Path) -> tuple[int, dict[str, int]]:
    """The bytes of every tensor in the folder's safetensors files, and the tensor count per dtype."""
    tensor_bytes, dtypes = 0, {}
    for file in sorted(folder.glob("*.safetensors")):
        for info in safetensors_header(file).values():
            start, end = info["data_offsets"]
            tensor_bytes += end - start
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + 1
    return tensor_bytes, dtypes


def summarize(folder: Path, method: str) -> Checkpoint:
    tensor_bytes, dtypes = _tensor_bytes(folder)
    quant_file = folder / "hf_quant_config.json"
    return Checkpoint(path=folder.resolve(), method=method, tensor_bytes=tensor_bytes, dtypes=dtypes,
                      file_bytes=sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
                      hf_quant_config=json.loads(quant_file.read_text()) if quant_file.is_file() else None)


def serve_commands(ckpt: Checkpoint, overrides: list[str], port: int = 8000) -> list[str]:
    """The commands that serve the checkpoint, and the gb10exp command that benchmarks the served model."""
    folder = str(ckpt.path)
    vllm = f"vllm serve {folder} --port {port}"
    if ckpt.quant_algo in VLLM_QUANTIZATION:
        vllm += f" --quantization {VLLM_QUANTIZATION[ckpt.quant_algo]}"
    dropped = ("backend", "export", "export_dir", "tracking.run_name", "+experiment", "audit", "quant.layerwise",
               "quant.offload_dir")
    keep = [o for o in overrides if (key := o.split("=", 1)[0]).lstrip("~+") not in dropped
            and not key.startswith("backend.")]
    url = f"http://127.0.0.1:{port}/v1"
    bench = " ".join(["python -m gb10exp", *keep, "backend=openai", f"backend.options.base_url={url}",
                      "backend.options.prompt_format=tokens"])
    return [f"trtllm-serve {folder} --port {port}", vllm, bench]


def export_run(model: torch.nn.Module, tokenizer: Any, cfg: Config, job_output_dir: str | Path,
               overrides: list[str]) -> tuple[Checkpoint, list[str]]:
    """Write the run's checkpoint where ``export`` / ``export_dir`` say; return it and its serving commands."""
    fmt = formats.of(cfg.qformat, cfg.kv_cache_qformat)
    folder = Path(cfg.export_dir).expanduser() if cfg.export_dir else Path(job_output_dir) / "checkpoint"
    ckpt = write_checkpoint(model, tokenizer, folder, fmt.modelopt)
    if fmt.modelopt and ckpt.quant_algo != fmt.quant_algo:  # the support matrix is keyed by the derived one
        log.warning("qformat=%s exported as quant_algo %s, but gb10exp.quant.formats derived %s: the engine "
                    "support tag may be wrong", fmt.name, ckpt.quant_algo, fmt.quant_algo)
    commands = serve_commands(ckpt, overrides)
    log.info("checkpoint written to %s (%.3f GiB, quant_algo %s); serve it with:\n  %s", ckpt.path,
             ckpt.file_bytes / 2**30, ckpt.quant_algo or "none", "\n  ".join(commands))
    return ckpt, commands


def _job_output_dir() -> Path:
    """Hydra's folder of the running job (outputs/<sweep>/<job>); the working directory outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def record(model: torch.nn.Module, tokenizer: Any, cfg: Config, overrides: list[str],
           rec: Any) -> dict[str, float]:
    """The runner's one export step: write the checkpoint, record path, size and hf_quant_config.json in the
    run (tags ``export.*``, artifacts ``export/``), print how to serve it; returns its metrics."""
    ckpt, commands = export_run(model, tokenizer, cfg, _job_output_dir(), overrides)
    rec.set_tags(ckpt.tags())
    if ckpt.hf_quant_config is not None:
        rec.log_dict(ckpt.hf_quant_config, "export/hf_quant_config.json")
    rec.log_text("\n".join(commands) + "\n", "export/serve.txt")
    head = f"gb10exp: checkpoint {ckpt.path} ({ckpt.file_bytes / 2**30:.3f} GiB); serve and benchmark it:"
    print("\n".join([head, *(f"  {c}" for c in commands)]), flush=True)
    return ckpt.metrics()
