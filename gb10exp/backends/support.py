"""Which engine serves which quantization format on which GPU: one table, as data, with its sources.

A cell is ``native`` (the format's own kernels), ``emulated`` (it runs, but the numerics are simulated or the
kernel falls back to another scheme: not the format's speed) or ``unsupported`` (fails to load or is refused),
and names its upstream file or page (checked 2026-11-26). ``markdown()`` renders the README's matrix (a test
keeps the two identical). Rows: ``Format.row`` (gb10exp/quant/formats.py: modelopt's ``quant_algo`` in
hf_quant_config.json, ``GGUF`` for llama.cpp's formats, ``none`` unquantized). Columns: ``gb10exp.hardware``'s
architectures: ``hopper`` (sm_90), ``blackwell`` (datacenter sm_100/sm_103), ``gb10`` (DGX Spark, sm_121; the
sm_12x family, TensorRT-LLM's "Blackwell (sm120)" row), ``ada`` (sm_89), ``ampere`` (sm_80/86/87), ``cpu``.
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
ALGOS = ("FP8", "NVFP4", "W4A16_NVFP4", "NVFP4_AWQ", "W4A16_AWQ", "W4A8_AWQ", "MIXED_PRECISION", "NVFP4_SVD",
         "W4A8_NVFP4_FP8", "MXFP8", "mxfp4", "GGUF", "none")  # modelopt 0.47 writes mxfp4 in lower case
MX_ALGOS = ("MXFP8", "mxfp4")
MARK = {NATIVE: "native", EMULATED: "emulated", UNSUPPORTED: "-"}  # a cell as the README's tables show it

# Sources (one per claim; file paths are in the engine's GitHub repository or package), re-checked 2026-12-05
# against TensorRT-LLM's 2026 code and PR threads, the vLLM 0.33.0 wheel, Ollama at fb30760 (2026-08-21) and the
# llama.cpp that llama-cpp-python 0.3.36 vendors (0c1e570, 2026-10-01).
TRT_ALGOS = "NVIDIA/TensorRT-LLM tensorrt_llm/quantization/mode.py (QuantAlgo)"
TRT_HW = ("NVIDIA/TensorRT-LLM docs/source/features/quantization.md (Hardware Support Matrix; GB10 = the "
          "Blackwell sm120 row)")
TRT_GPU = "NVIDIA/TensorRT-LLM docs/source/features/quantization.md (PyTorch backend, NVIDIA GPUs only)"
TRT_W4A16_NVFP4 = ("NVIDIA/TensorRT-LLM PR #16511 (W4A16_NVFP4: sm_120/121 kernels) and tests/unittest/_torch "
                   "test_fp4_linear.py (FP4 Marlin W4A16 on sm_89-99); mode.py is_fp4_supported")
TRT_FP4_GATE = "NVIDIA/TensorRT-LLM tensorrt_llm/quantization/mode.py is_fp4_supported (sm_100/103/120/121)"
TRT_NVFP4_AWQ = ("NVIDIA/TensorRT-LLM tests/unittest/quantization/test_mode.py (QuantAlgo.NVFP4_AWQ, canonical "
                 "NVFP4 kernels)")
TRT_AWQ_SM120 = "NVIDIA/TensorRT-LLM PR #11561 (Fix int4 awq for sm120/121)"
TRT_MXFP8 = "NVIDIA/TensorRT-LLM tests/unittest/quantization/test_mxfp8_format.py (QuantAlgo.MXFP8; sm_100/103)"
VLLM_ALGOS = "vllm-project/vllm 0.33.0 vllm/model_executor/layers/quantization/modelopt.py (QUANT_ALGOS)"
VLLM_FP8 = ("vllm-project/vllm 0.33.0 vllm/model_executor/layers/quantization/modelopt.py "
            "(ModelOptFp8Config.get_min_capability 80; Marlin FP8 W8A16 below sm_89)")
VLLM_FP4 = ("vllm-project/vllm 0.33.0 vllm/model_executor/layers/quantization/modelopt.py (ModelOptNvFp4Config: "
            "CUTLASS W4A4 GEMM on sm_100/sm_120, FP4 Marlin weight-only GEMM below; min capability 75)")
VLLM_MXFP8 = ("vllm-project/vllm 0.33.0 vllm/model_executor/layers/quantization/modelopt.py (ModelOptMxFp8Config: "
              "FlashInfer mm_mxfp8 on sm_100/sm_12x, Marlin MXFP8 W8A16 on sm_80+)")
VLLM_MIXED = ("vllm-project/vllm 0.33.0 vllm/model_executor/layers/quantization/modelopt.py "
              "(ModelOptMixedPrecisionConfig, min capability 75)")
VLLM_GGUF = "vllm-project/vllm-gguf-plugin 0.0.5 (GGUF moved out of vLLM; CUDA/ROCm; no NVFP4/MXFP4 GGUF types)"
VLLM_CPU = "vllm-project/vllm docs/getting_started/installation/cpu.md (CPU backend: bf16/fp32)"
VLLM_GPU = "vllm-project/vllm docs/getting_started/installation/gpu.md (CUDA GPUs, compute capability >= 7.0)"
LLAMACPP = "ggml-org/llama.cpp docs/build.md and gguf-py/gguf/constants.py (GGUF types, CPU and CUDA)"
LLAMACPP_CONVERT = ("ggml-org/llama.cpp conversion/base.py prepare_tensors, _repack_nvfp4 (convert_hf_to_gguf.py "
                    "of llama-cpp-python 0.3.36)")
LLAMACPP_FP4 = ("ggml-org/llama.cpp ggml/src/ggml-cpu/ggml-cpu.c (NVFP4 x Q8_0), ggml/src/ggml-cuda/mmq.cu, "
                "common.cuh blackwell_mma_available (FP4 MMA on sm_120/121 only); docs/nvfp4_in_llamacpp.md")
LLAMACPP_NO = "ggml-org/llama.cpp conversion/base.py (l.363 broadcast error; l.630 cannot map pre_quant_scale)"
OLLAMA = "ollama/ollama docs/import.md and fs/ggml/type.go (GGUF types, incl. NVFP4 via llama.cpp b10488)"
OLLAMA_FP4 = ("ollama/ollama x/create/prequant.go (ollama create --experimental: modelopt NVFP4 into the MLX "
              "runner, input_scale dropped)")
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
    marlin = "opt-in Marlin route only (nvfp4_gemm_allowed_backends incl. marlin: weight-only)"

    def hw(yes: tuple[str, ...], what: str, source: str = TRT_HW, no: dict | None = None) -> dict[str, Cell]:
        return _row({a: Cell(NATIVE, source) for a in yes} | {"cpu": cpu} | (no or {}),
                    Cell(UNSUPPORTED, source, f"{what} kernels do not exist for this GPU"))

    return {
        "FP8": hw(("hopper", "blackwell", "gb10", "ada"), "FP8 (compute capability >= 8.9)"),
        "NVFP4": hw(("blackwell", "gb10"), "NVFP4 (Blackwell only)",
                    no={a: Cell(UNSUPPORTED, TRT_HW, f"NVFP4: {marlin}") for a in ("hopper", "ada")}),
        "W4A16_NVFP4": _row({"cpu": cpu, "ampere": Cell(UNSUPPORTED, TRT_W4A16_NVFP4, "no kernel seen for sm_80"),
                             "gb10": Cell(NATIVE, TRT_W4A16_NVFP4, "dedicated sm_120/121 kernels (PR #16511)"),
                             "blackwell": Cell(NATIVE, TRT_FP4_GATE, "allowed by the sm_100 gate; kernel not verified")},
                            Cell(NATIVE, TRT_W4A16_NVFP4, "FP4 Marlin weight-only GEMM")),
        "NVFP4_AWQ": hw(("blackwell", "gb10"), "NVFP4", TRT_NVFP4_AWQ),
        "W4A16_AWQ": hw(("hopper", "ada", "ampere", "blackwell"), "W4A16 AWQ",
                        no={"gb10": Cell(NATIVE, TRT_AWQ_SM120, "int4 AWQ fixed for sm_120/121; docs still lag")}),
        "W4A8_AWQ": hw(("hopper", "ada", "blackwell"), "W4A8 AWQ (Ada, Hopper, sm_100/103)"),
        "W4A8_NVFP4_FP8": hw(("blackwell", "gb10"), "W4A8 NVFP4 x FP8", TRT_FP4_GATE),
        "MXFP8": hw(("blackwell",), "MXFP8 (sm_100/103)", TRT_MXFP8),
        "mxfp4": _row({"cpu": cpu}, Cell(UNSUPPORTED, TRT_ALGOS, "modelopt writes 'mxfp4' in lower case: "
                                                                 "QuantAlgo('mxfp4') raises at load")),
        "NVFP4_SVD": _row({"cpu": cpu}, no_algo),
        # A mixed checkpoint lists a quant_algo per layer; each must run here (in practice NVFP4 + FP8).
        "MIXED_PRECISION": hw(("blackwell", "gb10"), "the NVFP4 layers of a modelopt mixed-precision checkpoint",
                              no={a: Cell(UNSUPPORTED, TRT_HW, f"its NVFP4 layers: {marlin}") for a in ("hopper", "ada")}),
        "GGUF": _row({}, Cell(UNSUPPORTED, TRT_ALGOS, "TensorRT-LLM loads Hugging Face checkpoints, not GGUF")),
        "none": _row({"cpu": cpu}, Cell(NATIVE, TRT_HW, "bf16/fp16")),
    }


def _vllm() -> dict[str, dict[str, Cell]]:
    cpu = Cell(UNSUPPORTED, VLLM_FP8, "vLLM's modelopt kernels are CUDA kernels")
    no_algo = Cell(UNSUPPORTED, VLLM_ALGOS, "not in vLLM's modelopt QUANT_ALGOS: refused at load")
    marlin = Cell(EMULATED, VLLM_FP4, "FP4 Marlin weight-only GEMM: activations stay 16-bit, not W4A4")
    blackwell = {"blackwell", "gb10"}
    return {
        "FP8": _row({"ampere": Cell(EMULATED, VLLM_FP8, "FP8 Marlin weight-only GEMM (W8A16)"),
                     "cpu": Cell(EMULATED, VLLM_FP8, "CPU FP8 weight kernels (read from the source, not run)")},
                    Cell(NATIVE, VLLM_FP8)),
        "NVFP4": _row({a: Cell(NATIVE, VLLM_FP4) for a in blackwell} | {"cpu": cpu}, marlin),
        "W4A16_NVFP4": _row({"cpu": cpu}, Cell(NATIVE, VLLM_FP4, "FP4 Marlin weight-only GEMM")),
        "MXFP8": _row({a: Cell(NATIVE, VLLM_MXFP8) for a in blackwell} | {"cpu": cpu},
                      Cell(EMULATED, VLLM_MXFP8, "Marlin MXFP8 weight-only GEMM (W8A16)")),
        "MIXED_PRECISION": _row({a: Cell(NATIVE, VLLM_MIXED) for a in blackwell} | {"cpu": cpu},
                                Cell(EMULATED, VLLM_MIXED, "its NVFP4 layers run the FP4 Marlin weight-only GEMM")),
        **{algo: _row({}, no_algo) for algo in ("NVFP4_AWQ", "W4A16_AWQ", "W4A8_AWQ", "NVFP4_SVD",
                                                 "W4A8_NVFP4_FP8", "mxfp4")},
        "GGUF": _row({"cpu": Cell(UNSUPPORTED, VLLM_GGUF, "GGUF kernels are CUDA/ROCm kernels")},
                     Cell(EMULATED, VLLM_GGUF, "a plugin (vllm[extra-quant]); slower than llama.cpp's own kernels")),
        "none": _row({"cpu": Cell(NATIVE, VLLM_CPU)}, Cell(NATIVE, VLLM_GPU, "bf16/fp16")),
    }


def _llamacpp() -> dict[str, dict[str, Cell]]:
    """llama.cpp runs GGUF files; modelopt checkpoints reach it through its converter (gguf.py ``deploy``)."""
    w4a4 = "NVFP4 weight kernels with 8-bit activations (Q8_0 on the CPU, q8_1 on CUDA): not W4A4's 4-bit ones"
    no = Cell(UNSUPPORTED, LLAMACPP_NO, "its converter cannot repack this export (pre_quant_scale or MX scales)")
    rows = {algo: _row({}, no) for algo in ALGOS}
    rows["NVFP4"] = _row({"gb10": Cell(NATIVE, LLAMACPP_FP4, "FP4 tensor-core MMA for prefill; decode with 8-bit "
                                                             "activations")}, Cell(EMULATED, LLAMACPP_FP4, w4a4))
    rows["W4A16_NVFP4"] = _row({}, Cell(NATIVE, LLAMACPP_FP4, "NVFP4 weights (activations at 8 bits, not 16)"))
    rows["FP8"] = _row({}, Cell(EMULATED, LLAMACPP_CONVERT, "FP8 weights dequantized to F16 by the converter"))
    rows["MIXED_PRECISION"] = _row({}, Cell(EMULATED, LLAMACPP_CONVERT, "NVFP4 layers repacked, FP8 layers at F16"))
    rows["GGUF"] = _row({}, Cell(NATIVE, LLAMACPP))
    rows["none"] = _row({}, Cell(NATIVE, LLAMACPP, "converted to an F16/BF16 GGUF"))
    return rows


def _ollama() -> dict[str, dict[str, Cell]]:
    no = Cell(UNSUPPORTED, OLLAMA, "Ollama runs GGUF files (and imports safetensors it quantizes itself)")
    rows = {algo: _row({}, no) for algo in ALGOS}
    for algo in ("NVFP4", "W4A16_NVFP4"):
        rows[algo] = _row({"cpu": no}, Cell(EMULATED, OLLAMA_FP4, "experimental import, weight-only"))
    rows["GGUF"] = _row({}, Cell(NATIVE, OLLAMA))
    rows["none"] = _row({}, Cell(NATIVE, OLLAMA, "converted to an F16/BF16 GGUF"))
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
    "llamacpp": _llamacpp(),
    "ollama": _ollama(),
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
        return Cell(UNSUPPORTED, "gb10exp/backends/support.py",
                    f"{engine} x {algo} x {arch} is not in the matrix")
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
    """``quantization``: what computed the numbers. ``nvfp4`` (NVFP4 formats only): "simulated" where modelopt's
    fake quantization computed them (the hf backend always), "deployed" where an engine ran an NVFP4 tensor type
    without FP4 tensor cores, "native" only where it used FP4 tensor cores (from Blackwell on)."""
    if fmt.kind == "none":
        return {"quantization": "none"}
    engine = BACKEND_ENGINES.get(backend)
    cell = lookup(engine, fmt, hardware.arch(device)) if engine else None
    runs_it = engine not in (None, "hf") and cell is not None and cell.status != UNSUPPORTED
    if fmt.kind == "gguf":
        tags = {"quantization": f"by the engine ({fmt.gguf_type})"}
    elif runs_it:
        tags = {"quantization": f"simulated (modelopt fake quantization) for perplexity, KL and top-1; "
                                f"{cell.status} in {backend} for speed and the *_deployed figures"}
    else:
        tags = {"quantization": "simulated (modelopt fake quantization)"}
    if fmt.nvfp4:
        tags["nvfp4"] = _nvfp4(engine if runs_it or fmt.kind == "gguf" else None, device)
    return tags


def _nvfp4(engine: str | None, device: torch.device) -> str:
    if engine is None:
        return "simulated"
    if not hardware.fp4_tensor_cores(device):
        return "deployed"
    if engine == "llamacpp":  # ggml-cuda: FP4 MMA only on sm_120/121 and only for batches above 8 tokens
        return ("native (FP4 tensor cores for prefill; decode with 8-bit activations)"
                if hardware.arch(device) == "gb10" else "deployed")
    return "native"


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
    raise ConfigError(f"backend={backend} cannot serve qformat={fmt.name!r} (quant_algo {fmt.row}) on "
                      f"{arch}: {cell.note} [{cell.source}]; instead: {'; or '.join(instead)}")


def check(cfg: Config) -> None:
    """Preflight, per job: the engine x format x GPU of ``cfg`` must not be unsupported."""
    refuse(cfg.backend.name, formats.of(cfg.qformat, cfg.kv_cache_qformat), hardware.arch(hardware.resolve(cfg.device)))


def markdown() -> str:
    """The matrix as the README shows it: one table per engine, a row per format, a column per architecture."""
    lines = ["<!-- generated by gb10exp.backends.support.markdown(); edit the table in support.py -->", ""]
    for engine in ENGINES:
        lines += [f"**{engine}**", "", "| quant_algo | " + " | ".join(ARCHS) + " |",
                  "|---|" + "---|" * len(ARCHS)]
        lines += [f"| {algo} | " + " | ".join(MARK[lookup(engine, algo, a).status] for a in ARCHS) + " |"
                  for algo in ALGOS]
        sources = sorted({c.source for row in MATRIX[engine].values() for c in row.values()})
        lines += ["", "Sources: " + "; ".join(sources), ""]
    return "\n".join(lines)


GLANCE = (("trtllm", "gb10"), ("trtllm", "hopper"), ("vllm", "gb10"), ("vllm", "hopper"), ("llamacpp", "gb10"),
          ("llamacpp", "cpu"))
NAMES = {"trtllm": "TensorRT-LLM", "vllm": "vLLM", "llamacpp": "llama.cpp", "gb10": "GB10", "hopper": "Hopper",
         "cpu": "CPU"}


def glance() -> str:
    """The README's matrix: the serving engines on GB10 and Hopper (and llama.cpp on a CPU), a row per
    quant_algo with the conf/qformat options that export as it."""
    by_row: dict[str, list[str]] = {}
    for name in formats.options():
        by_row.setdefault(formats.of(formats.load_qformat(name)).row, []).append(f"`{name}`")
    lines = ["<!-- generated by gb10exp.backends.support.glance(); edit the table in support.py -->",
             "| quant_algo (formats) | " + " | ".join(f"{NAMES[e]} on {NAMES[a]}" for e, a in GLANCE) + " |",
             "|---|" + "---|" * len(GLANCE)]
    lines += [f"| {algo} ({', '.join(by_row[algo])}) | "
              + " | ".join(MARK[lookup(engine, algo, arch).status] for engine, arch in GLANCE) + " |"
              for algo in ALGOS if algo != "none" and algo in by_row]
    return "\n".join(lines)
