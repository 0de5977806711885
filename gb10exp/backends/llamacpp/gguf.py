"""GGUF files of the configured model, made once and cached: in llama.cpp's own types, or deployed from a
modelopt checkpoint.

- llama.cpp's types (``qformat.gguf_type``: Q4_K_M, NVFP4...): from the model's own GGUF where it is one (the
  embedded SmolLM2 is a Q4_1 GGUF, ``model=local model.path=x.gguf``), else from an F16 GGUF written by
  llama.cpp's ``convert_hf_to_gguf.py``; then llama.cpp's quantizer (``llama_model_quantize``). The pinned
  llama.cpp has no ftype for NVFP4 ("invalid output file type 39": no case in src/llama-quant.cpp's
  ``llama_ftype_get_default_type``), so ``gguf_nvfp4`` is a Q8_0 base with every linear weight overridden to
  GGML_TYPE_NVFP4 (round to nearest, one E4M3 scale per 16 values, no per-tensor scale:
  ``quantize_row_nvfp4_ref`` in ggml-quants.c) and the embedding and output head at F16, as in modelopt's.
- modelopt formats (``deploy``): the run's fake-quantized model exported and converted by the same converter
  (what it makes of each quant_algo, and which ones crash it: ``CONVERTIBLE``; its ``_repack_nvfp4``).

The converter is in no wheel: ``make converter`` installs it into the venv from the pinned, hash-checked
source archive (``install_converter``); it runs with its own ``gguf-py`` (the ``gguf`` wheel lacks what it
needs). Nothing is downloaded or run from the cache at run time; results are keyed by content.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from gb10exp.config import ConfigError, ModelConfig
from gb10exp.models import embedded_file, hub_snapshot
from gb10exp.models.gguf_file import read_gguf
from gb10exp.quant.cache import model_identity
from gb10exp.quant.export import write_checkpoint
from gb10exp.quant.formats import Format
from gb10exp.utils import cache_dir, content_key, publish_dir, safe_name

log = logging.getLogger(__name__)

CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
# modelopt quant_algo -> what the pinned converter does with it (conversion/base.py prepare_tensors). The others
# crash it: NVFP4_AWQ, NVFP4_SVD, W4A16_AWQ, W4A8_AWQ ("Can not map tensor ...pre_quant_scale"), W4A8_NVFP4_FP8,
# mxfp4, MXFP8 (block scales it cannot broadcast).
CONVERTIBLE = {
    "NVFP4": "repacked losslessly into llama.cpp's NVFP4 type (input_scale stored, unused)",
    "W4A16_NVFP4": "repacked losslessly into llama.cpp's NVFP4 type",
    "FP8": "dequantized to F16 (llama.cpp has no FP8 type): FP8-rounded weights at 16 bits",
    "MIXED_PRECISION": "NVFP4 layers repacked into llama.cpp's NVFP4 type, FP8 layers dequantized to F16",
}
MIXABLE = ("NVFP4", "W4A16_NVFP4", "FP8")  # per-layer formats a MIXED_PRECISION checkpoint may hold here
# Every linear weight of a Llama-style GGUF (llama.cpp's tensor names): what gguf_nvfp4 quantizes.
LINEAR_WEIGHTS = rb"blk\.\d+\.(attn_(q|k|v|qkv|output)|ffn_(gate|up|down))\.weight"
# GGUF general.file_type values (llama.cpp's LLAMA_FTYPE) of the source files we may meet.
SOURCE_FTYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 15: "Q4_K_M", 32: "BF16", 39: "NVFP4"}


def _file_key(path: Path) -> str:
    """Cache key of a source GGUF: its content, not its name and size."""
    return f"{safe_name(path.stem)}-{content_key(path)}"


def source_gguf(cfg: ModelConfig) -> Path | None:
    """The model's own GGUF file, when the model is one."""
    if cfg.source == "embedded":
        return embedded_file(cfg)
    if cfg.source == "local":
        path = Path(cfg.path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return path
        if cfg.gguf_file:
            return path / cfg.gguf_file
    if cfg.source == "hub" and cfg.gguf_file:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(cfg.id, cfg.gguf_file, revision=cfg.revision))
    return None


def file_type(path: Path) -> str | None:
    """The GGUF's declared type (general.file_type), e.g. "Q4_1"; None if it does not say."""
    ftype = read_gguf(path).fields.get("general.file_type")
    return SOURCE_FTYPES.get(ftype) if ftype is not None else None


def converter_dir(version: str | None = None) -> Path:
    """Where ``make`` installs llama.cpp's converter for llama-cpp-python ``version``: inside the venv,
    never in the (shared, writable) cache, so nobody who can write the cache decides what code runs."""
    version = version or metadata.version("llama-cpp-python")
    return Path(sys.prefix) / "share" / "gb10exp" / "llama.cpp-convert" / version


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py for the installed llama-cpp-python, installed with the venv
    (``install_converter``); never downloaded at run time."""
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ConfigError(
            f"llama.cpp's convert_hf_to_gguf.py is not installed for llama-cpp-python "
            f"{metadata.version('llama-cpp-python')} ({script}): run `make converter` (pinned, hash-checked "
            "source archive), or convert the model yourself and pass model=local model.path=FILE.gguf")
    return script


def install_converter(sdist: Path, sha256: str) -> Path:
    """Extract convert_hf_to_gguf.py (+ conversion/, gguf-py/) from llama-cpp-python's source archive
    ``sdist``, after checking its SHA-256 against the pinned ``sha256``, into ``converter_dir``."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{sdist.name}: sha256 {digest} is not the pinned {sha256}; refusing to install it")
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]  # llama_cpp_python-<version>
    final = converter_dir(top.removeprefix("llama_cpp_python-"))
    with publish_dir(final) as tmp, tarfile.open(sdist) as tar:
        prefix = f"{top}/vendor/llama.cpp/"
        for member in tar.getmembers():
            rel = member.name.removeprefix(prefix)
            if member.name.startswith(prefix) and rel.startswith(CONVERTER_MEMBERS) and member.isfile():
                member.name = rel
                tar.extract(member, tmp, filter="data")
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise SystemExit(f"{sdist.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
    return final / "convert_hf_to_gguf.py"


def _hf_folder(cfg: ModelConfig, model: torch.nn.Module, tokenizer, key: str) -> Path:
    """A transformers folder holding the model: the hub snapshot or local folder, else a saved copy."""
    if cfg.source == "local" and Path(cfg.path).expanduser().is_dir():
        return Path(cfg.path).expanduser()
    if cfg.source == "hub":
        return hub_snapshot(cfg)  # config, tokenizer, safetensors only
    folder = cache_dir("gguf", "hf-copies") / key  # random weights: save what is in memory
    if not (folder / "config.json").is_file():
        with publish_dir(folder) as tmp:
            model.to(torch.float32 if model.dtype == torch.float32 else torch.float16).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return folder


def _model_key(cfg: ModelConfig) -> str:
    """What fixes the converted weights: the model's identity from its content (files, hub commit)."""
    described = json.dumps(model_identity(cfg), sort_keys=True, default=str)
    return f"{safe_name(cfg.name)}-{hashlib.sha256(described.encode()).hexdigest()[:12]}"


def run_converter(folder: Path, out: Path, outtype: str = "f16", script: Path | None = None) -> None:
    """llama.cpp's convert_hf_to_gguf.py (``script``, default the installed one) on a Hugging Face checkpoint
    folder, in a child process; one line with its last error otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # set at all, it skips its own gguf-py
    command = [sys.executable, str(script or converter()), str(folder), "--outfile", str(out), "--outtype", outtype]
    got = subprocess.run(command, capture_output=True, text=True, env=env)
    if got.returncode != 0 or not out.is_file():
        last = (got.stderr or got.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {folder}: {last[0][:300]}")


def convert_to_f16(cfg: ModelConfig, model: torch.nn.Module, tokenizer) -> Path:
    key = _model_key(cfg)
    out = cache_dir("gguf") / key / "F16.gguf"
    if out.is_file():
        return out
    folder = _hf_folder(cfg, model, tokenizer, key)
    with publish_dir(out.parent) as tmp:
        log.info("converting %s to GGUF F16 with llama.cpp's converter", cfg.name)
        run_converter(folder, Path(tmp) / "F16.gguf")
    return out


def convertible(fmt: Format) -> str | None:
    """Why the pinned converter cannot take this modelopt format's export, or None when it can."""
    if fmt.quant_algo == "MIXED_PRECISION":
        from gb10exp.quant.formats import load_qformat, of

        rows = sorted({of(load_qformat(name)).row for name in fmt.candidates})
        bad = [r for r in rows if r not in MIXABLE]
        return f"its layers may be {', '.join(bad)}, which the converter cannot repack" if bad else None
    if fmt.quant_algo not in CONVERTIBLE:
        return (f"llama.cpp's converter cannot repack quant_algo {fmt.quant_algo} (it converts "
                f"{', '.join(CONVERTIBLE)})")
    return None


def deploy(model: torch.nn.Module, tokenizer, fmt: Format, key: str) -> tuple[Path, str]:
    """(path, how it was made) of the run's modelopt-quantized model as a GGUF llama.cpp runs: exported
    (``export_hf_checkpoint``) and converted; cached by ``key`` (the quantized model's content key). The export
    packs the model's weights in place: the runner deploys after every PyTorch evaluation of it."""
    out = cache_dir("gguf", "deployed") / key / f"{fmt.name}.gguf"
    how = f"modelopt export ({fmt.quant_algo}), then convert_hf_to_gguf.py: {CONVERTIBLE[fmt.quant_algo]}"
    if out.is_file():
        return out, how
    with tempfile.TemporaryDirectory(prefix="export-", dir=cache_dir("gguf", "deployed")) as folder:
        log.info("exporting %s for llama.cpp and converting it with llama.cpp's converter", fmt.name)
        write_checkpoint(model, tokenizer, Path(folder), quantized=True)
        with publish_dir(out.parent) as tmp:
            run_converter(Path(folder), Path(tmp) / out.name)
    return out, how


def _params(gguf_type: str):
    """llama_model_quantize's parameters for ``gguf_type``; NVFP4 through per-tensor overrides (see above)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.allow_requantize = True  # the embedded model is a Q4_1 GGUF already
    params.nthread = len(os.sched_getaffinity(0))
    if gguf_type != "NVFP4":
        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}", None)
        if ftype is None:
            raise ConfigError(f"qformat.gguf_type={gguf_type!r} is not known to this llama-cpp-python; "
                              "choose another GGUF type or upgrade llama-cpp-python")
        params.ftype = ftype
        return params, ()
    # Overrides apply only over a quantized base type (llama_tensor_get_type: if ggml_is_quantized(default)).
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.token_embedding_type = params.output_tensor_type = llama_cpp.GGML_TYPE_F16
    overrides = (llama_cpp.llama_model_tensor_override * 2)()
    overrides[0].pattern, overrides[0].type = LINEAR_WEIGHTS, llama_cpp.GGML_TYPE_NVFP4
    overrides[1].pattern = None  # the list ends with a NULL pattern
    params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    kv = (llama_cpp.llama_model_kv_override * 2)()  # the file says NVFP4 (else its base type, Q8_0)
    kv[0].tag, kv[0].key = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, b"general.file_type"
    kv[0].value.val_i64 = llama_cpp.LLAMA_FTYPE_MOSTLY_NVFP4
    kv[1].key = b""  # the list ends with an empty key
    params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    return params, (overrides, kv)  # the arrays must outlive the call


def quantize(source: Path, gguf_type: str, out: Path) -> None:
    """llama.cpp's quantizer; re-quantizing an already quantized file is allowed (the embedded model)."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    params, keep = _params(gguf_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{os.getpid()}-{out.name}"  # renamed into place only when complete
    try:
        with suppress_stdout_stderr(disable=False):  # one log line per tensor otherwise
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise RuntimeError(f"llama_model_quantize({source.name} -> {gguf_type}) returned {rc}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    del keep


def build_gguf(cfg: ModelConfig, gguf_type: str, model: torch.nn.Module, tokenizer) -> tuple[Path, str]:
    """(path, how it was made) of the model as a GGUF of ``gguf_type``; cached."""
    source = source_gguf(cfg)
    if source is not None:
        source_type = file_type(source)
        if source_type == gguf_type:
            return source, f"the model's own {gguf_type} GGUF"
        key, origin = _file_key(source), f"re-quantized from the model's {source_type or 'own'} GGUF"
    else:
        source = convert_to_f16(cfg, model, tokenizer)
        key, origin = source.parent.name, "converted to F16 by convert_hf_to_gguf.py"
        if gguf_type == "F16":
            return source, origin
    out = cache_dir("gguf") / key / f"{gguf_type}.gguf"
    if not out.is_file():
        log.info("quantizing %s to %s with llama.cpp", source.name, gguf_type)
        quantize(source, gguf_type, out)
    return out, f"{origin}, then {gguf_type} by llama_model_quantize"


if __name__ == "__main__":  # python -m gb10exp.backends.llamacpp.gguf SDIST SHA256  (the Makefile's converter target)
    print(install_converter(Path(sys.argv[1]), sys.argv[2]))
