"""On-disk cache of quantized models, so a sweep over evaluation or backend settings calibrates each
(model, format, calibration) once (evaluation results: ``gb10exp.evaluate.cache``, keyed by ``quant_key``).

``quantized/<quant_key>/modelopt.pth`` is ``mto.save`` of the calibrated model (modelopt state + weights),
restored onto a freshly loaded model with ``mto.restore``. The key hashes everything that determines the
entry (``quant_key``); the calibration tokens themselves stand for dataset, file content, seq_len,
calib_size, seed and tokenizer. An entry appears under its name only complete (``publish_dir``: written
to a temporary folder, then renamed): a crash leaves none half-written, and two processes filling the
same entry both succeed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from gb10exp.config import Config, ModelConfig
from gb10exp.models import embedded_file
from gb10exp.quant import calibration_loop, formats, quantize
from gb10exp.quant.nvfp4_cpu import cpu_nvfp4
from gb10exp.utils import cache_dir, content_key, publish_dir

log = logging.getLogger(__name__)

STATE_FILE = "modelopt.pth"
VERSIONED = ("torch", "transformers", "nvidia-modelopt")
PACKAGE = Path(__file__).resolve().parent.parent


def _str_keys(obj: Any) -> Any:
    """modelopt configs mix int and str keys ({-1: 16, "type": "dynamic"}), which json cannot sort."""
    if isinstance(obj, dict):
        return {str(k): _str_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_str_keys(v) for v in obj]
    return obj


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(_str_keys(obj), sort_keys=True, default=str).encode()).hexdigest()[:24]


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def source_digest(folder: str) -> str:
    """The code that computes an entry: a change to it must not serve stale results."""
    files = sorted((PACKAGE / folder).rglob("*.py"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def _file_stamp(path: Path) -> list:
    """A file's name and content digest (not its folder: a moved model keeps its cache entries)."""
    return [path.name, content_key(path)]


def model_identity(cfg: ModelConfig) -> dict[str, Any]:
    """What fixes the model's weights: its config (not its display name) and where the files came from."""
    ident: dict[str, Any] = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("name", "path")}
    if cfg.source == "embedded":
        ident["files"] = _file_stamp(embedded_file(cfg))
    elif cfg.source == "local":
        path = Path(cfg.path).expanduser()
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        ident["files"] = [_file_stamp(p) for p in files]
    elif cfg.source == "hub":  # a moving branch: key on the commit actually downloaded
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(cfg.id, cfg.gguf_file or "config.json", revision=cfg.revision)
        ident["commit"] = Path(found).parent.name if isinstance(found, str) else None
    return ident


def quant_key(cfg: Config, calib: torch.Tensor, device: torch.device, dtype: torch.dtype) -> str:
    quantizing = formats.of(cfg.qformat, cfg.kv_cache_qformat).modelopt
    return digest({
        "model": model_identity(cfg.model),
        "modelopt_cfg": formats.modelopt_config(cfg.qformat, cfg.kv_cache_qformat),
        # An unquantized model does not depend on calibration: one key for every calib setting.
        "calib": _tensor_digest(calib) if quantizing else None,
        "calib_batch_size": cfg.calib.batch_size if quantizing else None,
        "device": device.type,
        "dtype": str(dtype),
        "versions": {p: metadata.version(p) for p in VERSIONED},
        "code": source_digest("quant"),
    })


def quantize_cached(
    model: torch.nn.Module, cfg: Config, calib: torch.Tensor, device: torch.device, key: str,
    offloaded: bool = False,
) -> tuple[torch.nn.Module, str]:
    """``quantize`` through the cache: (model, "hit" | "miss" | "off..." | "none" when nothing is quantized).
    ``key``: the job's ``quant_key`` (computed once per job, also for the eval cache).

    ``quant.layerwise`` is not in the key: with the scale-only algorithms it allows, the result is bit-identical
    (docs/large_models.md), so an in-memory layerwise job and an ordinary one share entries. An ``offloaded``
    model bypasses the cache: ``mto.save`` would store its on-disk weights as meta tensors."""
    if not formats.of(cfg.qformat, cfg.kv_cache_qformat).modelopt:
        return model, "none"
    loop = calibration_loop(calib, cfg.calib.batch_size, device)
    run = lambda m: quantize(m, cfg.qformat, loop, cfg.kv_cache_qformat, cfg.quant.layerwise, offloaded,  # noqa: E731
                             device)
    if not cfg.cache or offloaded:
        return run(model), "off" if not cfg.cache else "off: quant.offload_dir (weights on disk are not cached)"
    entry = cache_dir("quantized") / key
    if (entry / STATE_FILE).is_file():
        return _restore(model, entry, device), "hit"
    model = run(model)
    _save(model, entry, cfg)
    return model, "miss"


def _restore(model: torch.nn.Module, entry: Path, device: torch.device) -> torch.nn.Module:
    import modelopt.torch.opt as mto

    log.info("restoring the quantized model from %s", entry)
    try:
        with cpu_nvfp4():
            return mto.restore(model, str(entry / STATE_FILE), map_location=str(device))
    except Exception as exc:  # unreadable despite the atomic publish (disk fault, manual edits)
        raise RuntimeError(f"cached quantized model {entry} cannot be restored ({type(exc).__name__}: "
                           f"{str(exc)[:160]}); delete that folder or run with cache=false") from exc


def _save(model: torch.nn.Module, entry: Path, cfg: Config) -> None:
    import modelopt.torch.opt as mto

    with publish_dir(entry) as tmp:
        mto.save(model, str(tmp / STATE_FILE))
        meta = {"model": cfg.model.name, "qformat": cfg.qformat.name, "calib": dataclasses.asdict(cfg.calib),
                "calib_size": cfg.calib_size, "seed": cfg.seed, "kv_cache_qformat": cfg.kv_cache_qformat}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))  # for people browsing the cache
