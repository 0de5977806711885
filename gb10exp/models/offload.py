"""A model whose decoder layers stay on disk (``quant.offload_dir``): for models larger than memory.

The weights are written once into ``<offload_dir>/<model>-<key>-<dtype>/`` in accelerate's offload format
(one raw ``<name>.dat`` per tensor plus ``index.json``), in the compute dtype, one tensor in memory at a
time. The model is then built on the meta device; its embedding, final norm, rotary buffers and lm_head
are loaded into memory, and ``accelerate.dispatch_model`` hooks every decoder layer to the disk: a layer's
weights are read (a memmap of that one tensor, then a copy) just before it runs and dropped after.

Why this way and not transformers' own ``device_map`` disk offload (docs/large_models.md has the figures):
- safetensors 0.8's default reader maps the *whole* file private and writable for every tensor it reads,
  which a memory limit counts as the file's size; the ``pread`` backend used here reads one tensor.
- the embedding stays resident: modelopt's export runs a dummy forward on ``model.device`` (the first
  parameter's), and an offloaded embedding would be re-read at every batch of every layer's calibration pass.
- ``dispatch_model`` (not ``accelerate.disk_offload``) puts a hook on each decoder layer itself, which
  modelopt's layerwise calibration and streaming export look for.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from gb10exp.config import ModelConfig
from gb10exp.models import embedded_cache, hub_snapshot, load_model
from gb10exp.utils import content_key, publish_dir, safe_name

log = logging.getLogger(__name__)

INDEX = "index.json"


@dataclass
class Offloaded:
    """What the offloaded model keeps where."""

    folder: Path  # the .dat files
    disk_bytes: int  # the decoder layers' tensors, kept on disk
    resident_bytes: int  # the tensors loaded into memory (embedding, norm, lm_head)
    layers: str  # the decoder layers' module name, e.g. model.layers


def source_folder(cfg: ModelConfig) -> Path:
    """The folder holding the model's config.json and safetensors files."""
    if cfg.source == "embedded":  # its float32 safetensors, dequantized from the GGUF file once (in memory)
        folder = embedded_cache(cfg)
        if not (folder / "model.safetensors").is_file():
            load_model(cfg, torch.device("cpu"), torch.float32)
        return folder
    if cfg.source == "hub":
        return hub_snapshot(cfg)
    return Path(cfg.path).expanduser()


def offload_folder(cfg: ModelConfig, offload_dir: str | Path, dtype: torch.dtype) -> Path:
    """``offload_dir``'s entry for this model and dtype, written if missing (atomically: a crash leaves none)."""
    from accelerate.utils import offload_weight, save_offload_index
    from safetensors import safe_open

    source = source_folder(cfg)
    if not (shards := sorted(source.glob("*.safetensors"))):
        raise FileNotFoundError(f"{source} holds no *.safetensors file to offload")
    key = content_key_of(shards)
    entry = Path(offload_dir).expanduser() / f"{safe_name(cfg.name)}-{key}-{str(dtype).removeprefix('torch.')}"
    if (entry / INDEX).is_file():
        return entry
    log.info("writing %s's weights to %s (once per model and dtype)", cfg.name, entry)
    with publish_dir(entry) as tmp:
        index: dict = {}
        for shard in shards:
            # backend="pread": one tensor in memory; the default maps the whole file (see the module docstring)
            with safe_open(str(shard), framework="pt", backend="pread") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    offload_weight(f.get_tensor(name).to(dtype), name, str(tmp), index)
        save_offload_index(index, str(tmp))
        (tmp / "config.json").write_bytes((source / "config.json").read_bytes())
    return entry


def content_key_of(files: list[Path]) -> str:
    return hashlib.sha256(" ".join(f"{p.name}:{content_key(p)}" for p in files).encode()).hexdigest()[:16]


def _layers_name(model: torch.nn.Module) -> str:
    """The decoder layers' module name, as modelopt's layerwise calibration finds them (e.g. model.layers)."""
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    layers = LayerActivationCollector.get_decoder_layers(model)
    name = next((n for n, m in model.named_modules() if m is layers), None) if layers is not None else None
    if name is None:
        raise RuntimeError(f"quant.offload_dir: modelopt's layerwise calibration finds no decoder layers in "
                           f"{type(model).__name__} (it knows model.model.layers of Hugging Face decoder LMs "
                           "whose layers share one class); run it without quant.offload_dir")
    return name


def load_offloaded(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                   offload_dir: str | Path) -> tuple[torch.nn.Module, Offloaded]:
    """The model with its decoder layers on disk and the rest on ``device`` (where the layers also run)."""
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import load_offloaded_weight, set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    pin_mmap_threshold()
    folder = offload_folder(cfg, offload_dir, dtype)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    model.tie_weights()
    if getattr(model.config, "architectures", None) is None:
        model.config.architectures = [type(model).__name__]
    layers = _layers_name(model)
    index = json.loads((folder / INDEX).read_text())
    params = dict(model.named_parameters(remove_duplicate=False))
    disk = resident = 0
    loaded: set[int] = set()
    for name, param in params.items():
        if name.startswith(layers + "."):
            disk += param.numel() * param.element_size()
            continue
        if id(param) in loaded:  # the other name of a tied pair: tie_weights below shares the one copy
            continue
        loaded.add(id(param))
        # A tied pair is saved under one of its names (save_model keeps one): read it from whichever is there.
        stored = name if name in index else next((n for n, p in params.items() if p is param and n in index), None)
        if stored is None:
            raise RuntimeError(f"{folder}: no tensor {name} (nor a tied alias of it) in {INDEX}")
        value = load_offloaded_weight(str(folder / f"{stored}.dat"), index[stored])
        set_module_tensor_to_device(model, name, device, value=value)
        resident += value.numel() * value.element_size()
    model.tie_weights()
    # Each decoder layer on disk; every module beside the path from the root to the layers on the device.
    parts = layers.split(".")
    device_map: dict[str, str | torch.device] = {}
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        for child, _ in (model.get_submodule(parent) if parent else model).named_children():
            full = f"{parent}.{child}" if parent else child
            if full != ".".join(parts[: depth + 1]):
                device_map[full] = device
    for i in range(len(model.get_submodule(layers))):
        device_map[f"{layers}.{i}"] = "disk"
    dispatch_model(model, device_map=device_map, main_device=device, offload_dir=str(folder))
    return model.eval(), Offloaded(folder, disk, resident, layers)


def pin_mmap_threshold(threshold: int = 128 * 1024) -> None:
    """Serve every allocation above ``threshold`` bytes from its own mapping, returned to the system when
    freed. glibc otherwise raises its threshold after the first large free (up to 32 MiB), and the per-tensor
    reads of an offloaded model then leave hundreds of MiB of freed heap counted as resident
    (what the environment variable MALLOC_MMAP_THRESHOLD_=131072 does for a whole process)."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to pin
            ctypes.CDLL(name).mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD


class ReadCounter:
    """Bytes read from the offload folder while the block runs: the loader the model's hooks share is given
    a subclass that counts what each ``__getitem__`` returns from disk (accelerate has no counter of its own)."""

    def __init__(self, model: torch.nn.Module):
        from accelerate.utils.offload import OffloadedWeightsLoader

        hooks = [getattr(m, "_hf_hook", None) for m in model.modules()]
        hooks = [h for hook in hooks if hook is not None for h in getattr(hook, "hooks", [hook])]  # SequentialHook
        maps = [getattr(h, "weights_map", None) for h in hooks]
        self.loaders = {id(d): d for d in (getattr(w, "dataset", w) for w in maps)
                        if isinstance(d, OffloadedWeightsLoader)}
        self.bytes = 0
        counter = self

        class Counting(OffloadedWeightsLoader):
            def __getitem__(self, key: str) -> torch.Tensor:
                tensor = super().__getitem__(key)
                if key not in self.state_dict:  # read from its .dat file
                    counter.bytes += tensor.numel() * tensor.element_size()
                return tensor

        for loader in self.loaders.values():
            loader.__class__ = Counting
