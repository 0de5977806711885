"""llama.cpp's real quantized speed on one GPU: 16-bit vs Q4_K_M vs modelopt NVFP4 as deployed, and llama.cpp's
own NVFP4, side by side in one process (issue 23, behaviour 6).

    GB10EXP_COMMIT=<commit> benchmarks/llamacpp_gpu.sh --shape llama3_1_8b     # the device call (see the .sh)
    python benchmarks/llamacpp_gpu.py --shape tiny --device cpu --llama-bin BUILD/bin --work /tmp/lgpu \\
        --out /tmp/lgpu/out                                                      # dry run on a CPU

One process, so that every figure comes from the same machine:
1. llama.cpp (the pinned source, trimmed: ``--src``) is built in the background with CUDA for sm_90,
   llama-bench and llama-quantize only (``--llama-bin`` skips this with binaries built elsewhere);
2. meanwhile a Llama of ``--shape`` with random bf16 weights is built on the device and saved as a Hugging
   Face checkpoint; the same model is quantized by modelopt (``NVFP4_DEFAULT_CFG``, random-token calibration)
   and exported (``write_checkpoint``); llama.cpp's pinned ``convert_hf_to_gguf.py`` converts both
   (``run_converter``): the F16 GGUF and the deployed NVFP4 GGUF. The copy bandwidth is measured
   (``hardware.measure_bandwidth``);
3. once built: Q4_K_M from the F16 GGUF, and llama.cpp's own NVFP4 (Q8_0 base, every linear weight overridden
   to NVFP4, embedding and output at F16: the recipe of ``gguf._params``), both by llama-quantize; then
   llama-bench on every GGUF, all layers on the GPU, batch 1: prompt (pp) and decode (tg) tokens/s, ``--reps``
   samples each (median and range), and the decode bound from the GGUF's own bytes (``bytes.from_gguf``,
   ``decode_step_bytes``, with the KV cache at the test's mean context) at the measured bandwidth;
4. with Nsight Systems on the machine and time left, one short profiled llama-bench per NVFP4 GGUF lists the
   CUDA kernels that ran.

The JSON and its ``.log`` (``--out``/llamacpp_gpu_<gpu>.json) are rewritten after every step, so a call cut
short by its time limit still returns what was done; ``--deadline-s`` starts no step that cannot finish.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the repository, without installing it

from hf_decode import SHAPES, commit, gpu_short_name  # noqa: E402

from gb10exp import hardware  # noqa: E402
from gb10exp.backends.llamacpp.gguf import LINEAR_WEIGHTS, run_converter  # noqa: E402
from gb10exp.bench.roofline import decode_bound  # noqa: E402
from gb10exp.models import random_llama  # noqa: E402
from gb10exp.quant import bytes as qbytes  # noqa: E402
from gb10exp.quant.export import write_checkpoint  # noqa: E402
from gb10exp.quant.nvfp4_cpu import cpu_nvfp4  # noqa: E402

# The vendored llama.cpp of llama-cpp-python 0.3.36 (its CHANGELOG: "update llama.cpp to ggml-org/llama.cpp@0c1e57098").
LLAMA_CPP_COMMIT = "0c1e57098"
# The recipe that built on the device machine (issue 23, behaviour 6), plus the commit for llama-bench's JSON.
CMAKE_FLAGS = [
    "-DGGML_CUDA=ON",
    "-DCMAKE_CUDA_ARCHITECTURES=90",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}",
]
NVCC = "/usr/local/cuda/bin/nvcc"
# name -> how the GGUF is made; benchmarked in this order (the ones needing llama-quantize last)
VARIANTS = {
    "nvfp4_modelopt": "modelopt NVFP4_DEFAULT_CFG export (W4A4), repacked into NVFP4 by convert_hf_to_gguf.py",
    "f16": "the bf16 checkpoint converted to F16 by convert_hf_to_gguf.py",
    "q4_k_m": "llama-quantize Q4_K_M from the F16 GGUF",
    "nvfp4_llamacpp": "llama-quantize: Q8_0 base, linear weights NVFP4, token embedding and output F16 (no "
    "calibration)",
}
# What llama-quantize is given per variant made from the F16 GGUF (options, type).
QUANTIZE = {
    "q4_k_m": ([], "Q4_K_M"),
    # The pinned llama-quantize has no NVFP4 ftype; overrides apply over a quantized base (see gguf._params).
    "nvfp4_llamacpp": (
        [
            "--token-embedding-type",
            "f16",
            "--output-tensor-type",
            "f16",
            "--tensor-type",
            f"{LINEAR_WEIGHTS.decode()}=nvfp4",
            "--override-kv",
            "general.file_type=int:39",
        ],
        "Q8_0",
    ),
}
# Load-log lines worth keeping (llama.cpp's own account of what it used).
LOG_LINES = re.compile(
    r"ggml_cuda_init|Device \d+:|- type|offloaded|buffer size|Flash Attention|flash_attn|"
    r"file type|CUDA Graph|graphs|system_info"
)
TYPE_LINE = re.compile(r"- type\s+(\w+):\s+(\d+) tensors")  # llama_model_loader's count per tensor type
CALIB_BATCHES, CALIB_LEN = 4, 256  # random tokens: activation ranges for input_scale only; speed ignores them


class Report:
    """Everything said and found so far; ``save`` rewrites the JSON and the log (after every step)."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.args, self.started, self.lines = args, time.perf_counter(), []
        self.lock = threading.Lock()  # the two conversions report from their threads
        self.data: dict = {
            "command": command,
            "commit": commit(),
            "shape": args.shape,
            "arch": SHAPES[args.shape],
            "llama_cpp_commit": LLAMA_CPP_COMMIT,
            "llama_bench": {"n_prompt": args.n_prompt, "n_gen": args.n_gen, "reps": args.reps, "ngl": 99},
            "variants": {},
            "steps": {},
            "failed": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {text}"
        print(line, flush=True)
        self.lines.append(line)

    def step(self, name: str, seconds: float) -> None:
        self.data["steps"][name] = round(seconds, 1)
        self.say(f"{name}: {seconds:.1f} s")
        self.save()

    def save(self) -> Path:
        with self.lock:
            return self._save()

    def _save(self) -> Path:
        gpu = gpu_short_name(self.data.get("machine", {}).get("gpu", "cpu"))
        out = Path(self.args.out) / f"llamacpp_gpu_{gpu}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        out.write_text(json.dumps(self.data, indent=2))
        out.with_suffix(".log").write_text(
            f"$ {self.data['command']}\ncommit {self.data['commit']}\n" + "\n".join(self.lines) + "\n"
        )
        return out


def shell(command: list[str], timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kw)


def first_line(command: list[str]) -> str:
    try:
        got = shell(command, timeout=30)
        return (
            (got.stdout or got.stderr).strip().splitlines()[0] if (got.stdout or got.stderr).strip() else ""
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"


def machine(device: torch.device) -> dict:
    info = {
        "gpu": hardware.name(device),
        "host": platform.node(),
        "cpu": hardware.cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cmake": first_line(["cmake", "--version"]),
    }
    if device.type == "cuda":
        info["nvidia_smi"] = first_line(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        )
        info["nvcc"] = (
            shell([NVCC, "--version"]).stdout.strip().splitlines()[-1] if Path(NVCC).is_file() else "none"
        )
    for package in ("transformers", "nvidia-modelopt"):
        from importlib import metadata

        info[package] = metadata.version(package)
    return info


def start_build(src: Path, work: Path, jobs: int) -> tuple[subprocess.Popen, Path, list[float]]:
    """Extract the trimmed source and build llama-bench and llama-quantize in the background; the third item
    gets the finishing time (perf_counter) once the build ends, whoever waits for it."""
    tree = work / "llama.cpp-src"
    shutil.rmtree(tree, ignore_errors=True)
    with tarfile.open(src) as tar:
        tar.extractall(tree, filter="data")
    source = next(tree.iterdir())  # the archive's one top folder
    build = work / "llama.cpp-build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [
        "cmake",
        "-S",
        str(source),
        "-B",
        str(build),
        *generator,
        *CMAKE_FLAGS,
        f"-DCMAKE_CUDA_COMPILER={NVCC}",
    ]
    compile_ = ["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama-bench", "llama-quantize"]
    log = open(work / "build.log", "w")  # noqa: SIM115 (the background process writes it until it ends)
    process = subprocess.Popen(
        ["bash", "-c", f"{shlex.join(configure)} && {shlex.join(compile_)}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # one process group: stopped together (os.killpg) at the deadline
    )
    done: list[float] = []
    threading.Thread(
        target=lambda: (process.wait(), done.append(time.perf_counter()), log.close()), daemon=True
    ).start()
    return process, build / "bin", done


def make_checkpoints(
    args, device: torch.device, tokenizer, work: Path, pool: ThreadPoolExecutor, report: Report
) -> dict[str, Future]:
    """The bf16 checkpoint and the modelopt NVFP4 export of one random model, each handed to the converter
    as soon as it is written; returns the conversions under way."""
    import modelopt.torch.quantization as mtq

    # The tokenizer's ids must fit the embedding; a larger vocabulary is padded by the converter ([PADn]).
    arch = SHAPES[args.shape] | {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": max(SHAPES[args.shape]["vocab_size"], len(tokenizer)),
    }
    t = time.perf_counter()
    model = random_llama(arch, 0, device, torch.bfloat16)
    report.data["parameters"] = sum(p.numel() for p in model.parameters())
    report.step("model_build", time.perf_counter() - t)

    t = time.perf_counter()
    folder16 = work / "hf-bf16"
    model.save_pretrained(str(folder16))
    tokenizer.save_pretrained(str(folder16))
    report.step("save_bf16_checkpoint", time.perf_counter() - t)
    conversions = {"f16": pool.submit(convert, folder16, work / "f16.gguf", args, report)}

    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, len(tokenizer), (1, CALIB_LEN), generator=generator).to(device)
        for _ in range(CALIB_BATCHES)
    ]

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in batches:
                m(batch)

    t = time.perf_counter()
    with cpu_nvfp4():  # modelopt's NVFP4 quantizer refuses CPU tensors: the project's adapter (dry run only)
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    if device.type == "cuda":
        torch.cuda.synchronize()
    report.step("modelopt_quantize_nvfp4", time.perf_counter() - t)

    t = time.perf_counter()
    folder4 = work / "hf-nvfp4"
    ckpt = write_checkpoint(model, tokenizer, folder4, quantized=True)
    report.data["nvfp4_export"] = {
        "quant_algo": ckpt.quant_algo,
        "tensor_bytes": ckpt.tensor_bytes,
        "dtypes": ckpt.dtypes,
    }
    report.step("modelopt_export_nvfp4", time.perf_counter() - t)
    conversions["nvfp4_modelopt"] = pool.submit(convert, folder4, work / "nvfp4_modelopt.gguf", args, report)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return conversions


def convert(folder: Path, out: Path, args, report: Report) -> tuple[Path, dict]:
    """The converted GGUF and its facts (read here, while llama.cpp builds: a 128k vocabulary takes seconds)."""
    t = time.perf_counter()
    run_converter(folder, out, "f16", script=args.converter / "convert_hf_to_gguf.py")
    report.step(f"convert_{out.stem}", time.perf_counter() - t)
    shutil.rmtree(folder)  # the disk holds the GGUFs of an 8B model, not their checkpoints too
    return out, gguf_facts(out, args.n_gen)


def gguf_facts(path: Path, n_gen: int) -> dict:
    """Size and the bytes a decode step reads, from the file's own header (its tensor types: from llama.cpp's
    load log, in ``bench``)."""
    tensors = qbytes.from_gguf(path)
    # llama-bench's tg test starts from an empty cache: its tokens see n_gen / 2 tokens of context on average.
    return {
        "file_bytes": path.stat().st_size,
        "tensor_bytes": tensors.weight_bytes,
        "decode_step_bytes": qbytes.decode_step_bytes(tensors, context=n_gen / 2),
        "kv_bytes_per_token": tensors.kv_bytes_per_token,
    }


def quantize(bin_dir: Path, source: Path, variant: str, work: Path, timeout: float) -> Path:
    options, base = QUANTIZE[variant]
    out = work / f"{variant}.gguf"
    got = shell(
        [str(bin_dir / "llama-quantize"), *options, str(source), str(out), base, str(os.cpu_count())],
        timeout=timeout,
    )
    (work / f"quantize_{variant}.log").write_text(got.stdout + got.stderr)
    if got.returncode != 0 or not out.is_file():
        raise RuntimeError(
            f"llama-quantize {variant} failed ({got.returncode}): {(got.stderr or got.stdout)[-300:]}"
        )
    return out


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": values}


def llama_bench(bin_dir: Path, path: Path, n_prompt: int, n_gen: int, reps: int) -> list[str]:
    """llama-bench on one GGUF, every layer on the GPU: the command both the timing and the profile run."""
    return [str(bin_dir / "llama-bench"), "-m", str(path), "-ngl", "99", "-p", str(n_prompt), "-n", str(n_gen),
            "-r", str(reps)]


def bench(bin_dir: Path, path: Path, args, timeout: float, work: Path) -> dict:
    """llama-bench on one GGUF: pp and tg tokens/s (every repetition), and the load log lines that say what
    llama.cpp used."""
    command = [*llama_bench(bin_dir, path, args.n_prompt, args.n_gen, args.reps), "-o", "json", "-v"]
    got = shell(command, timeout=timeout)
    (work / f"bench_{path.stem}.log").write_text(got.stderr)
    if got.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({got.returncode}): {got.stderr.strip()[-300:]}")
    tests = json.loads(got.stdout)
    out: dict = {"command": shlex.join(["llama-bench", *command[1:]])}
    for test in tests:
        kind = "pp" if test["n_gen"] == 0 else "tg"
        out[kind] = spread(test["samples_ts"]) | {"avg_ts": test["avg_ts"], "stddev_ts": test["stddev_ts"]}
    first = tests[0]
    out["llama_bench"] = {
        k: first.get(k)
        for k in (
            "build_commit",
            "build_number",
            "backends",
            "gpu_info",
            "model_type",
            "model_size",
            "model_n_params",
            "n_batch",
            "n_ubatch",
            "flash_attn",
            "type_k",
            "type_v",
            "n_threads",
        )
    }
    out["load_log"] = sorted({line.strip() for line in got.stderr.splitlines() if LOG_LINES.search(line)})
    out["tensor_types"] = {t: int(n) for t, n in TYPE_LINE.findall(got.stderr)}
    return out


def nsys_kernels(bin_dir: Path, path: Path, nsys: str, work: Path, timeout: float) -> list[dict]:
    """The CUDA kernels of a short llama-bench run (pp 512 and tg 32) by GPU time, from Nsight Systems."""
    report = work / f"prof_{path.stem}"
    shell(
        [
            nsys,
            "profile",
            "-t",
            "cuda",
            "-s",
            "none",
            "--cpuctxsw",
            "none",
            "-o",
            str(report),
            "--force-overwrite",
            "true",
            *llama_bench(bin_dir, path, 512, 32, 1),
        ],
        timeout=timeout,
    )
    got = shell(
        [nsys, "stats", "-q", "-r", "cuda_gpu_kern_sum", "-f", "csv", f"{report}.nsys-rep"], timeout=timeout
    )
    (work / f"kernels_{path.stem}.csv").write_text(got.stdout + got.stderr)
    rows = [line for line in got.stdout.splitlines() if line.strip()]
    start = next(
        (i for i, line in enumerate(rows) if line.startswith('"Time') or line.startswith("Time")), None
    )
    if start is None:
        raise RuntimeError(f"nsys stats gave no kernel table: {(got.stderr or got.stdout)[-300:]}")
    import csv

    table = list(csv.DictReader(rows[start:]))
    return [
        {"time_pct": float(r["Time (%)"]), "instances": int(r["Instances"]), "name": r["Name"][:300]}
        for r in table[:12]
    ]


def find_nsys() -> str | None:
    """Nsight Systems, on the PATH or where CUDA toolkits and NVIDIA's packages put it (often not on the PATH)."""
    places = [
        "usr/local/cuda/bin/nsys",
        "usr/local/cuda*/nsight-systems*/bin/nsys",
        "opt/nvidia/nsight-systems*/*/bin/nsys",
        "opt/nvidia/nsight-systems*/bin/nsys",
    ]
    found = [str(p) for place in places for p in sorted(Path("/").glob(place))]
    return shutil.which("nsys") or next(iter(found), None)


def table(variants: dict, gpu: str) -> str:
    head = (
        f"{'GGUF':<16}{'GB':>7}{'pp t/s':>10}{'range':>17}{'tg t/s':>9}{'range':>15}{'bound':>8}"
        f"{'% bound':>9}"
    )
    lines = [
        f"{gpu}: llama-bench, all layers on the GPU, batch 1; median and range of the repetitions",
        head,
        "-" * len(head),
    ]
    for name, v in variants.items():
        if "tg" not in v:
            continue
        pp, tg = v["pp"], v["tg"]
        pp_range, tg_range = f"{pp['min']:.0f}-{pp['max']:.0f}", f"{tg['min']:.1f}-{tg['max']:.1f}"
        lines.append(
            f"{name:<16}{v['gguf']['file_bytes'] / 1e9:>7.2f}{pp['median']:>10.0f}{pp_range:>17}"
            f"{tg['median']:>9.1f}{tg_range:>15}{v['decode_bound_tokens_per_s']:>8.0f}"
            f"{100 * v['roofline_fraction']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3_1_8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--src", type=Path, help="the trimmed llama.cpp source archive to build (CUDA, sm_90)"
    )
    parser.add_argument(
        "--llama-bin", type=Path, help="a folder with llama-bench and llama-quantize: no build"
    )
    parser.add_argument(
        "--converter", type=Path, required=True, help="folder of convert_hf_to_gguf.py (+ gguf-py)"
    )
    parser.add_argument("--tokenizer", type=Path, required=True, help="a saved tokenizer for the checkpoints")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lgpu"), help="checkpoints, GGUFs, the build")
    parser.add_argument("--out", required=True, help="folder for llamacpp_gpu_<gpu>.json and .log")
    parser.add_argument("--n-prompt", type=int, default=512)
    parser.add_argument("--n-gen", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument(
        "--deadline-s", type=float, default=None, help="start no step that cannot end by then"
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}"
    )
    args = parser.parse_args(argv)
    if (args.src is None) == (args.llama_bin is None):
        parser.error("give exactly one of --src (build llama.cpp here) and --llama-bin (built already)")
    wanted = args.variants.split(",")
    if bad := [v for v in wanted if v not in VARIANTS]:
        parser.error(f"--variants {bad} not allowed: of {list(VARIANTS)}")
    # The converter's own gguf-py reads the GGUFs here too: the version that wrote them.
    sys.path.insert(0, str(args.converter / "gguf-py"))
    from transformers import AutoTokenizer

    device = torch.device(args.device)
    report = Report(args, shlex.join(["llamacpp_gpu.py", *(sys.argv[1:] if argv is None else argv)]))
    report.data["machine"] = machine(device)
    report.data["variants_made"] = {v: VARIANTS[v] for v in wanted}
    report.say(f"machine: {report.data['machine']}")
    args.work.mkdir(parents=True, exist_ok=True)
    report.data["machine"]["disk_free_gb"] = round(shutil.disk_usage(args.work).free / 1e9, 1)

    def left() -> float:
        return (args.deadline_s - report.elapsed()) if args.deadline_s else 1e6

    if args.src is not None:
        build, bin_dir, built = start_build(args.src, args.work, args.jobs)
        build_start = time.perf_counter()
        report.say(f"building llama.cpp in the background ({args.jobs} jobs)")
    else:
        build, bin_dir, built = None, args.llama_bin, []

    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    with ThreadPoolExecutor(2) as pool:
        conversions = make_checkpoints(args, device, tokenizer, args.work, pool, report)
        t = time.perf_counter()
        bandwidth = hardware.measure_bandwidth(str(device))
        report.data["bandwidth"] = {
            "gbps": bandwidth.gbps,
            "min": bandwidth.lo,
            "max": bandwidth.hi,
            "method": bandwidth.method,
        }
        report.step("measure_bandwidth", time.perf_counter() - t)
        report.say(f"copy bandwidth {bandwidth.gbps:.0f} GB/s ({bandwidth.lo:.0f}-{bandwidth.hi:.0f})")
        converted = {name: future.result() for name, future in conversions.items()}
    ggufs = {name: path for name, (path, _) in converted.items()}

    if build is not None:
        try:
            build.wait(timeout=max(left() - 60, 1))  # a minute for at least one benchmark
        except subprocess.TimeoutExpired:
            tail = (args.work / "build.log").read_text().strip().splitlines()[-1:]  # how far it got
            report.data["build"] = {"returncode": None, "seconds": None, "log_tail": tail}
            os.killpg(build.pid, signal.SIGTERM)
            report.say(
                f"llama.cpp not built {report.elapsed():.0f} s in ({tail}): nothing to benchmark before the deadline"
            )
            report.save()
            raise SystemExit(1) from None
        seconds = (built[0] if built else time.perf_counter()) - build_start
        tail = (args.work / "build.log").read_text().strip().splitlines()[-5:]
        report.data["build"] = {
            "returncode": build.returncode,
            "seconds": round(seconds, 1),
            "configure": CMAKE_FLAGS + [f"-DCMAKE_CUDA_COMPILER={NVCC}"],
            "targets": ["llama-bench", "llama-quantize"],
            "jobs": args.jobs,
            "log_tail": tail,
        }
        report.step("llama_cpp_build", seconds)
        if build.returncode != 0:
            report.say("build failed:\n" + "\n".join(tail))
            report.save()
            raise SystemExit(1)

    for name in wanted:
        try:
            if name in QUANTIZE:
                if left() < 90:  # an 8B F16 GGUF takes tens of seconds; the subprocess stops at the deadline
                    raise TimeoutError(f"{left():.0f} s left before the deadline: not started")
                t = time.perf_counter()
                ggufs[name] = quantize(bin_dir, ggufs["f16"], name, args.work, timeout=left())
                report.step(f"quantize_{name}", time.perf_counter() - t)
            if left() < 60:
                raise TimeoutError(f"{left():.0f} s left before the deadline: not benchmarked")
            entry = report.data["variants"][name] = {"how": VARIANTS[name]}
            t = time.perf_counter()
            entry |= bench(bin_dir, ggufs[name], args, timeout=left(), work=args.work)
            report.step(f"bench_{name}", time.perf_counter() - t)
            # Read after the benchmark: speed first, should the time run out.
            entry["gguf"] = converted[name][1] if name in converted else gguf_facts(ggufs[name], args.n_gen)
            bound = decode_bound(bandwidth.gbps, entry["gguf"]["decode_step_bytes"])
            entry["decode_bound_tokens_per_s"] = bound
            entry["roofline_fraction"] = entry["tg"]["median"] / bound
            entry["roofline_fraction_range"] = [entry["tg"]["min"] / bound, entry["tg"]["max"] / bound]
            report.say(
                f"{name}: pp {entry['pp']['median']:.0f}, tg {entry['tg']['median']:.1f} tokens/s "
                f"({100 * entry['roofline_fraction']:.1f}% of {bound:.0f}); {entry['tensor_types']}"
            )
            report.save()
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, OSError) as exc:
            report.data["failed"][name] = f"{type(exc).__name__}: {exc}"[:500]
            report.say(f"{name} failed: {report.data['failed'][name]}")
            report.save()

    nsys = find_nsys()
    report.data["nsys"] = str(nsys) if nsys else "not found"
    for name in ("nvfp4_modelopt", "nvfp4_llamacpp"):
        if nsys and name in ggufs and device.type == "cuda" and left() > 60:
            try:
                t = time.perf_counter()
                report.data["variants"][name]["kernels"] = nsys_kernels(
                    bin_dir, ggufs[name], str(nsys), args.work, timeout=left() - 10
                )
                report.step(f"nsys_{name}", time.perf_counter() - t)
            except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as exc:
                report.data["failed"][f"nsys_{name}"] = f"{type(exc).__name__}: {exc}"[:500]
    report.say("\n" + table(report.data["variants"], report.data["machine"]["gpu"]))
    report.say(f"wrote {report.save()}")
    return report.data


if __name__ == "__main__":
    main()
