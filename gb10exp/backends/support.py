"""Which engine serves which quantization format on which GPU: one table, as data, with its sources.

Each cell says ``native`` (the engine runs the format's own kernels), ``emulated`` (it runs, but the numerics
are simulated or the kernel falls back to another scheme, so its speed is not the format's speed), or
``unsupported`` (it fails to load or is refused). Every cell names the upstream file or page it comes from
(checked 2026-11-26). The README's matrix is rendered from this table by ``markdown()``; a test keeps the
two identical.

Rows are keyed by ``Format.row`` (gb10exp/quant/formats.py: the ``quant_algo`` modelopt writes in
hf_quant_config.json, ``GGUF`` for llama.cpp's own formats, ``none`` for unquantized weights). Columns are
``gb10exp.hardware``'s architectures: ``hopper`` (sm_90), ``blackwell`` (datacenter sm_100/sm_103), ``gb10``
(DGX Spark's GB10, sm_121; the sm_12x family, where TensorRT-LLM's table has one "Blackwell (sm120)" row),
``ada`` (sm_89), ``ampere`` (sm_80/86/87), ``cpu``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gb10exp import hardware
from gb10exp.config import ConfigError
from gb10exp.quant import formats

if TYPE_CHECKING:
    import torch

    from gb10exp.config import Config
    from gb10exp.quant.formats import Format

NATIVE, EMULATED, UNSUPPORTED = "native", "emulated", "unsupported"
ENGINES = ("trtllm", "vllm", "llamacpp", "ollama", "hf")
ARCHS = ("hopper", "blackwell", "gb10", "ada", "ampere", "cpu")
ALGOS = (
    "FP8",
    "NVFP4",
    "W4A16_NVFP4",
    "NVFP4_AWQ",
    "W4A16_AWQ",
    "W4A8_AWQ",
    "MIXED_PRECISION",
    "NVFP4_SVD",  # the recipes (conf/qformat/): rows no engine below claims, so lookups say "unsupported"
    "W4A8_NVFP4_FP8",
    "MXFP8",
    "mxfp4",  # modelopt 0.47 writes this one in lower case
    "GGUF",
    "none",
)
MX_ALGOS = ("MXFP8", "mxfp4")
GPUS = ARCHS[:-1]

# Sources (one per claim; file paths are in the engine's GitHub repository).
TRT_ALGOS = "NVIDIA/TensorRT-LLM tensorrt_llm/quantization/mode.py (QuantAlgo)"
TRT_HW = (
    "NVIDIA/TensorRT-LLM docs/source/features/quantization.md (Hardware Support Matrix; GB10 = the "
    "Blackwell sm120 row)"
)
TRT_GPU = "NVIDIA/TensorRT-LLM docs/source/features/quantization.md (PyTorch backend, NVIDIA GPUs only)"
VLLM_ALGOS = "vllm-project/vllm vllm/model_executor/layers/quantization/modelopt.py (QUANT_ALGOS)"
VLLM_FP8 = (
    "vllm-project/vllm vllm/model_executor/layers/quantization/modelopt.py "
    "(ModelOptFp8Config.get_min_capability 89)"
)
VLLM_FP4 = (
    "vllm-project/vllm vllm/model_executor/layers/quantization/modelopt.py (ModelOptNvFp4Config: cutlass "
    "W4A4 GEMM on sm_100+/sm_12x, FP4 Marlin weight-only GEMM below; min capability 75)"
)
VLLM_MIXED = (
    "vllm-project/vllm vllm/model_executor/layers/quantization/modelopt.py "
    "(ModelOptMixedPrecisionConfig, min capability 75)"
)
VLLM_GGUF = "vllm-project/vllm docs/features/quantization/gguf.md (experimental, single-file GGUF)"
VLLM_CPU = "vllm-project/vllm docs/getting_started/installation/cpu.md (CPU backend: bf16/fp32)"
VLLM_GPU = "vllm-project/vllm docs/getting_started/installation/gpu.md (CUDA GPUs, compute capability >= 7.0)"
LLAMACPP = "ggml-org/llama.cpp docs/build.md and gguf-py/gguf/constants.py (GGUF types only, CPU and CUDA)"
LLAMACPP_NO = (
    "ggml-org/llama.cpp convert_hf_to_gguf.py (loads unquantized HF weights; modelopt packed "
    "weights are not a GGUF type)"
)
OLLAMA = "ollama/ollama docs/import.md (GGUF, or safetensors it quantizes itself to Q4_K_M/Q8_0)"
HF = "gb10exp/quant/__init__.py: modelopt fake quantization (mtq.quantize), the numerics only"
HF_CPU_FP4 = "gb10exp/quant/nvfp4_cpu.py (modelopt's NVFP4QTensor round trip on the CPU)"
HF_GGUF = "gb10exp/backends/hf/backend.py check (GGUF formats run on llama.cpp)"


@dataclass(frozen=True)
class Cell:
    status: str  # native | emulated | unsupported
    source: str
    note: str = ""


def _row(cells: dict[str, Cell], default: Cell | None = None) -> dict[str, Cell]:
    return {arch: cells.get(arch, default) for arch in ARCHS}


def _trtllm() -> dict[str, dict[str, Cell]]:
    cpu = Cell(UNSUPPORTED, TRT_GPU, "TensorRT-LLM runs on NVIDIA GPUs only")
    no_algo = Cell(UNSUPPORTED, TRT_ALGOS, "not a TensorRT-LLM QuantAlgo: the checkpoint fails to load")

    def hw(yes: tuple[str, ...], what: str) -> dict[str, Cell]:
        return _row(
            {a: Cell(NATIVE, TRT_HW) for a in yes} | {"cpu": cpu},
            Cell(UNSUPPORTED, TRT_HW, f"{what} kernels do not exist for this GPU"),
        )

    return {
        "FP8": hw(("hopper", "blackwell", "gb10", "ada"), "FP8 (compute capability >= 8.9)"),
        "NVFP4": hw(("blackwell", "gb10"), "NVFP4 (Blackwell only)"),
        "W4A16_NVFP4": _row({"cpu": cpu}, no_algo),
        "NVFP4_AWQ": _row({"cpu": cpu}, no_algo),
        "W4A16_AWQ": hw(("hopper", "ada", "ampere"), "W4A16 AWQ (Ampere, Ada, Hopper only)"),
        "W4A8_AWQ": hw(("hopper", "ada"), "W4A8 AWQ (Ada, Hopper only)"),
        # A mixed checkpoint lists a quant_algo per layer; each must run here (in practice NVFP4 + FP8).
        "MIXED_PRECISION": hw(
            ("blackwell", "gb10"), "the NVFP4 layers of a modelopt mixed-precision checkpoint"
        ),
        "GGUF": _row(
            {}, Cell(UNSUPPORTED, TRT_ALGOS, "TensorRT-LLM loads Hugging Face checkpoints, not GGUF")
        ),
        "none": _row({"cpu": cpu}, Cell(NATIVE, TRT_HW, "bf16/fp16")),
    }


def _vllm() -> dict[str, dict[str, Cell]]:
    cpu = Cell(UNSUPPORTED, VLLM_FP8, "vLLM's modelopt kernels are CUDA kernels")
    no_algo = Cell(UNSUPPORTED, VLLM_ALGOS, "not in vLLM's modelopt QUANT_ALGOS: refused at load")
    marlin = Cell(EMULATED, VLLM_FP4, "FP4 Marlin weight-only GEMM: activations stay 16-bit, not W4A4")
    return {
        "FP8": _row(
            {"ampere": Cell(UNSUPPORTED, VLLM_FP8, "needs compute capability >= 8.9"), "cpu": cpu},
            Cell(NATIVE, VLLM_FP8),
        ),
        "NVFP4": _row(
            {"blackwell": Cell(NATIVE, VLLM_FP4), "gb10": Cell(NATIVE, VLLM_FP4), "cpu": cpu}, marlin
        ),
        "W4A16_NVFP4": _row({"cpu": cpu}, Cell(NATIVE, VLLM_FP4, "FP4 Marlin GEMM (newer vLLM releases)")),
        "NVFP4_AWQ": _row({}, no_algo),
        "W4A16_AWQ": _row({}, no_algo),
        "W4A8_AWQ": _row({}, no_algo),
        "MIXED_PRECISION": _row(
            {"blackwell": Cell(NATIVE, VLLM_MIXED), "gb10": Cell(NATIVE, VLLM_MIXED), "cpu": cpu},
            Cell(EMULATED, VLLM_MIXED, "its NVFP4 layers run the FP4 Marlin weight-only GEMM"),
        ),
        "GGUF": _row(
            {"cpu": Cell(UNSUPPORTED, VLLM_CPU, "GGUF kernels are CUDA kernels")},
            Cell(EMULATED, VLLM_GGUF, "experimental; slower than llama.cpp's own kernels"),
        ),
        "none": _row({"cpu": Cell(NATIVE, VLLM_CPU)}, Cell(NATIVE, VLLM_GPU, "bf16/fp16")),
    }


def _gguf_engine(source: str, what: str) -> dict[str, dict[str, Cell]]:
    no = Cell(UNSUPPORTED, LLAMACPP_NO, f"{what} runs GGUF files; modelopt's packed checkpoints are not one")
    rows = {algo: _row({}, no) for algo in ALGOS if algo not in ("GGUF", "none")}
    rows["GGUF"] = _row({}, Cell(NATIVE, source))
    rows["none"] = _row({}, Cell(NATIVE, source, "converted to an F16/BF16 GGUF"))
    return rows


def _hf() -> dict[str, dict[str, Cell]]:
    fake = Cell(EMULATED, HF, "modelopt fake quantization: real accuracy, not the format's speed")
    rows = {algo: _row({}, fake) for algo in ALGOS if algo not in ("GGUF", "none")}
    for algo in ("NVFP4", "W4A16_NVFP4", "NVFP4_AWQ", "MIXED_PRECISION"):
        rows[algo] = _row({"cpu": Cell(EMULATED, HF_CPU_FP4, "NVFP4 through gb10exp's CPU adapter")}, fake)
    for algo in MX_ALGOS:  # E8M0 block scales: modelopt computes them only in its CUDA extension
        rows[algo] = _row({"cpu": Cell(UNSUPPORTED, HF, "modelopt 0.47's MX quantizers need CUDA")}, fake)
    rows["GGUF"] = _row({}, Cell(UNSUPPORTED, HF_GGUF, "llama.cpp quantizes GGUF formats"))
    rows["none"] = _row({}, Cell(NATIVE, "https://pytorch.org (PyTorch eager / compiled)"))
    return rows


MATRIX: dict[str, dict[str, dict[str, Cell]]] = {
    "trtllm": _trtllm(),
    "vllm": _vllm(),
    "llamacpp": _gguf_engine(LLAMACPP, "llama.cpp"),
    "ollama": _gguf_engine(OLLAMA, "Ollama"),
    "hf": _hf(),
}
# Rows not checked against an engine's sources (the newer recipes on the serving engines) say so and count
# as unsupported: preflight refuses rather than promise a kernel nobody verified.
for _engine, _rows in MATRIX.items():
    for _algo in ALGOS:
        _rows.setdefault(_algo, _row({}, Cell(UNSUPPORTED, "gb10exp/backends/support.py (unchecked)",
                                              f"{_algo} on {_engine}: not checked against its sources yet")))
# The engine behind each backend; backend=openai talks to whichever server runs (not known here).
BACKEND_ENGINES = {"hf": "hf", "trtllm": "trtllm", "llamacpp": "llamacpp"}


def lookup(engine: str, fmt: Format | str, arch: str) -> Cell:
    """The cell for ``engine`` x ``fmt`` (a Format, or a row key such as "NVFP4") x ``arch``."""
    algo = fmt if isinstance(fmt, str) else fmt.row
    row = MATRIX.get(engine, {}).get(algo)
    if row is None or arch not in row:
        return Cell(
            UNSUPPORTED, "gb10exp/backends/support.py", f"{engine} x {algo} x {arch} is not in the matrix"
        )
    return row[arch]


def native_engines(fmt: Format | str, arch: str) -> list[str]:
    return [e for e in ENGINES if lookup(e, fmt, arch).status == NATIVE]


def tag(backend: str, fmt: Format, arch: str) -> str:
    """The run tag ``support``: "<engine>/<arch>: <status>"."""
    engine = BACKEND_ENGINES.get(backend)
    if engine is None:
        return f"{backend}/{arch}: unknown (the server's engine decides)"
    return f"{engine}/{arch}: {lookup(engine, fmt, arch).status}"


def quantization_tags(backend: str, fmt: Format, device: torch.device) -> dict[str, str]:
    """``quantization``: what computed the numbers. ``nvfp4`` (NVFP4 formats only): "simulated" whenever
    modelopt's fake quantization computed them (the hf backend always), "native" only when an engine ran
    real FP4 kernels, which exist from Blackwell on."""
    if fmt.kind == "gguf":
        return {"quantization": f"by the engine ({fmt.gguf_type})"}
    if fmt.kind == "none":
        return {"quantization": "none"}
    engine = BACKEND_ENGINES.get(backend)  # hf's quantized cells are all emulated: modelopt's simulation
    native = engine is not None and lookup(engine, fmt, hardware.arch(device)).status == NATIVE
    tags = {"quantization": f"native ({backend} kernels) for speed and engine_perplexity; simulated (modelopt fake "
            "quantization) for perplexity, KL and top-1" if native
            else "simulated (modelopt fake quantization)"}
    if fmt.nvfp4:
        tags["nvfp4"] = "native" if native and hardware.fp4_tensor_cores(device) else "simulated"
    return tags


def _formats_native_on(engine: str, arch: str) -> list[str]:
    """The conf/qformat names this engine serves natively on ``arch``."""
    return [name for name in formats.options() if lookup(engine, formats.of(formats.load_qformat(name)), arch).status == NATIVE]


def refuse(backend: str, fmt: Format, arch: str) -> None:
    """Refuse an unsupported engine x format x GPU in one line naming what would work instead."""
    engine = BACKEND_ENGINES.get(backend)
    if engine is None or arch not in ARCHS or fmt.row not in ALGOS:
        return  # only what the matrix knows is refused (the run's `support` tag says the rest)
    cell = lookup(engine, fmt, arch)
    if cell.status != UNSUPPORTED:
        return
    others = [e for e in native_engines(fmt, arch) if e != "hf"]
    instead = [f"qformat in {_formats_native_on(engine, arch)} on backend={backend}"]
    if others:
        instead.insert(0, f"engine {' or '.join(others)} for {fmt.name}")
    raise ConfigError(
        f"backend={backend} cannot serve qformat={fmt.name!r} (quant_algo {fmt.row}) on {arch}: {cell.note} "
        f"[{cell.source}]; instead: {'; or '.join(instead)}"
    )


def check(cfg: Config) -> None:
    """Preflight, per job: the engine x format x GPU of ``cfg`` must not be unsupported."""
    refuse(cfg.backend.name, formats.of(cfg.qformat, cfg.kv_cache_qformat), hardware.arch(hardware.resolve(cfg.device)))


def markdown() -> str:
    """The matrix as the README shows it: one table per engine, a row per format, a column per architecture."""
    mark = {NATIVE: "native", EMULATED: "emulated", UNSUPPORTED: "-"}
    lines = ["<!-- generated by gb10exp.backends.support.markdown(); edit the table in support.py -->", ""]
    for engine in ENGINES:
        lines += [
            f"**{engine}**",
            "",
            "| quant_algo | " + " | ".join(ARCHS) + " |",
            "|---|" + "---|" * len(ARCHS),
        ]
        for algo in ALGOS:
            lines.append(
                f"| {algo} | " + " | ".join(mark[lookup(engine, algo, a).status] for a in ARCHS) + " |"
            )
        sources = sorted({c.source for row in MATRIX[engine].values() for c in row.values()})
        lines += ["", "Sources: " + "; ".join(sources), ""]
    return "\n".join(lines)
