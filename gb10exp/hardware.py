"""Which device a run is on and what it can do: one table, and the functions every other module asks.

``DEVICES`` has one row per device family (a new GPU is one row); the first row whose pattern the name
contains wins, so specific names come first. Memory size is read from the device itself, never from the
table: GB10 machines come with 128 GB and with 64 GB. Bandwidth is measured one way everywhere
(``measure_bandwidth``); the published peak, where the table knows the device, is recorded beside the
measurement, never instead of it.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gb10exp.config import ConfigError


@dataclass(frozen=True)
class DeviceSpec:
    pattern: str  # substring of the name torch or NVML report (or a user types), case-insensitive
    arch: str  # gb10exp/backends/support.py's column: hopper | blackwell | gb10 | ada | ampere | turing
    peak_gbps: float  # published peak memory bandwidth, GB/s
    fp4_tensor_cores: bool  # native NVFP4 MMA (Blackwell: sm_100 and sm_12x)


# Sources: the vendors' data sheets. GB10: 128 GB (or 64 GB) LPDDR5X, 256-bit, 8533 MT/s = 273 GB/s. The
# sm_12x family (GB10, RTX 50) shares its kernels and TensorRT-LLM's "Blackwell (sm120)" row: column gb10.
DEVICES: tuple[DeviceSpec, ...] = (
    DeviceSpec("GB10", "gb10", 273.0, True),
    DeviceSpec("GB200", "blackwell", 8000.0, True),
    DeviceSpec("B200", "blackwell", 8000.0, True),
    DeviceSpec("B100", "blackwell", 8000.0, True),
    DeviceSpec("RTX 5090", "gb10", 1792.0, True),
    DeviceSpec("H200", "hopper", 4800.0, False),
    DeviceSpec("H100 NVL", "hopper", 3900.0, False),
    DeviceSpec("H100 PCIe", "hopper", 2000.0, False),
    DeviceSpec("H100", "hopper", 3350.0, False),  # "NVIDIA H100 80GB HBM3": the SXM part
    DeviceSpec("H800", "hopper", 3350.0, False),
    DeviceSpec("A100-SXM4-80GB", "ampere", 2039.0, False),
    DeviceSpec("A100 80GB PCIe", "ampere", 1935.0, False),
    DeviceSpec("A100", "ampere", 1555.0, False),  # the 40 GB parts
    DeviceSpec("L40S", "ada", 864.0, False),
    DeviceSpec("L40", "ada", 864.0, False),
    DeviceSpec("L4", "ada", 300.0, False),
    DeviceSpec("A10G", "ampere", 600.0, False),
    DeviceSpec("RTX 4090", "ada", 1008.0, False),
    DeviceSpec("T4", "turing", 320.0, False),
)
GB10 = DEVICES[0]


def spec(name: str) -> DeviceSpec | None:
    """The table's row for a device name ("NVIDIA H100 80GB HBM3", "gb10", "h200"), or None."""
    return next((d for d in DEVICES if d.pattern.lower() in name.lower()), None)


def resolve(device: str) -> torch.device:
    """``device=auto`` is the GPU where there is one, else the CPU; a CUDA device this machine lacks is a
    one-line error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} is not allowed: no CUDA GPU is visible; use device=cpu or device=auto")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r} is not allowed: {torch.cuda.device_count()} CUDA GPU(s) are "
                              "visible; use device=cuda:0 .. or device=auto")
    return torch.device(device)


def name(device: torch.device | str) -> str:
    """The device's name as torch reports it; "cpu" for the CPU (and for a GPU this process cannot see)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return "cpu"


def capability_arch(capability: tuple[int, int]) -> str:
    """The support matrix column of a CUDA compute capability."""
    major, minor = capability
    if major >= 12:
        return "gb10"  # sm_120/sm_121: GB10 and the consumer Blackwell parts share kernels and TRT-LLM's row
    if major in (10, 11):
        return "blackwell"
    if major == 9:
        return "hopper"
    if (major, minor) >= (8, 9):
        return "ada"
    if major == 8:
        return "ampere"
    if (major, minor) == (7, 5):
        return "turing"
    return f"sm_{major}{minor}"  # older than the matrix: every lookup answers "not in the matrix"


def arch(device: torch.device | str) -> str:
    """The support matrix column of a device: cpu, or its GPU's architecture."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    if not torch.cuda.is_available():  # asked about a GPU this process cannot see (cfg.device=cuda, preflight)
        return "unknown"
    return capability_arch(torch.cuda.get_device_capability(device))


ARCH_ORDER = ("turing", "ampere", "ada", "hopper", "blackwell", "gb10")  # oldest first


def at_least(device: torch.device | str, oldest: str) -> bool:
    """The device is a GPU of architecture ``oldest`` or newer (e.g. "hopper" for PDL)."""
    here = arch(device)
    return here in ARCH_ORDER and ARCH_ORDER.index(here) >= ARCH_ORDER.index(oldest)


def check(cfg) -> None:
    """Preflight: ``device=cuda`` (or cuda:N) on a machine without that GPU fails here, for every job."""
    resolve(cfg.device)


def fp4_tensor_cores(device: torch.device | str) -> bool:
    """NVFP4 tensor cores exist from Blackwell on (sm_100, sm_12x; GB10 is 12.1). Having them says nothing
    about whether a run used them."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 10


def _proc_value(path: str, key: str) -> str | None:
    """What follows ``key`` and its colon on the first such line of a /proc file; None without one."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)


def cpu_name() -> str:
    return _proc_value("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


def memory_gib() -> float:
    """This machine's RAM (on a GB10 also the GPU's: one pool), from /proc/meminfo."""
    total = _proc_value("/proc/meminfo", "MemTotal:")
    return round(int(total.split()[0]) / 2**20, 1) if total else 0.0


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the kernel's resident high-water mark (VmHWM; writing 5 to /proc/self/clear_refs,
    Linux 4.0+) and, on a GPU, the CUDA allocator's. Where the reset is not allowed, peaks stay process-wide."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak bytes since the last ``reset_peak_memory``: ``rss`` (resident memory of this process, from VmHWM)
    and, on a GPU, ``gpu`` (what PyTorch's allocator held; on a GB10 that is the same memory pool as ``rss``)."""
    import resource  # Unix-only: imported here so that gb10exp.hardware (imported everywhere) loads anywhere

    hwm = _proc_value("/proc/self/status", "VmHWM:")
    # ru_maxrss (Linux: KiB) is the process-wide fallback
    rss = int(hwm.split()[0]) * 1024.0 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    out = {"rss": rss}
    if device.type == "cuda":
        out["gpu"] = float(torch.cuda.max_memory_allocated(device))
    return out


def describe(device: torch.device) -> str:
    """What computed the numbers, as one comparable string: "NVIDIA H100 80GB HBM3 sm_90", or on the CPU its
    model and thread count ("cpu AMD EPYC 7B13 x2": float reductions split by thread can differ)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} sm_{props.major}{props.minor}"
    return f"cpu {cpu_name()} x{torch.get_num_threads()}"


def facts(device: torch.device) -> dict[str, str]:
    """The device's facts as run tags."""
    out = {"hardware": describe(device), "cpu": cpu_name(), "cpu_count": str(torch.get_num_threads()),
           "memory_gib": str(memory_gib()), "device": device.type}
    if device.type != "cuda":
        return out | {"gpu": "none"}
    props = torch.cuda.get_device_properties(device)
    return out | {"gpu": props.name, "gpu_compute_capability": f"{props.major}.{props.minor}",
                  "gpu_memory_gib": str(round(props.total_memory / 2**30, 1)),
                  "gpu_fp4_tensor_cores": str(fp4_tensor_cores(device)).lower(), "cuda": str(torch.version.cuda)}


# -- memory bandwidth ------------------------------------------------------------------------------------
# Sizes well past any last-level cache (an H100's L2 is 50 MB, a CPU's L3 a few hundred MB at most). The
# smallest GPU size still pays a visible launch cost, so the bound is taken over the sizes at and above 1 GiB.
COPY_SIZES = {"cuda": (1 << 28, 1 << 30, 1 << 31), "cpu": (1 << 28, 1 << 29)}
COPY_REPEATS = 10
BANDWIDTH_METHOD = ("device-to-device fp32 copy (bytes read + written), CUDA events (host clock on a CPU), "
                    "sizes {sizes} x {repeats} repetitions after one warm-up each; median of the sizes >= 1 GiB "
                    "(the largest on a CPU), range = their min-max")


@dataclass(frozen=True)
class Bandwidth:
    """A measured copy bandwidth: the median of the repetitions and their range, and how it was measured."""

    gbps: float
    lo: float
    hi: float
    method: str
    by_size: dict[int, float]  # bytes copied -> median GB/s at that size

    def tags(self, prefix: str = "bandwidth") -> dict[str, str]:
        sizes = ", ".join(f"{size / 2**30:g} GiB {gbps:.0f}" for size, gbps in self.by_size.items())
        return {f"{prefix}.method": self.method, f"{prefix}.by_size_gbps": sizes}


def _copy_seconds(src: torch.Tensor, dst: torch.Tensor) -> float:
    if src.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - t


@functools.lru_cache(maxsize=8)
def measure_bandwidth(device: str, repeats: int = COPY_REPEATS) -> Bandwidth:
    """THE copy bound of ``device`` ("cuda", "cuda:1", "cpu"): measured once per process and device."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():  # a remote or non-torch engine's GPU
        dev = torch.device("cpu")
    sizes = COPY_SIZES["cuda" if dev.type == "cuda" else "cpu"]
    samples: dict[int, list[float]] = {}
    for size in sizes:
        src = torch.ones(size // 4, dtype=torch.float32, device=dev)
        dst = torch.empty_like(src)
        _copy_seconds(src, dst)  # first touch: page faults and allocation are not bandwidth
        samples[size] = [2 * size / _copy_seconds(src, dst) / 1e9 for _ in range(repeats)]
        del src, dst
    counted = [s for size in sizes if size >= min(1 << 30, sizes[-1]) for s in samples[size]]
    method = BANDWIDTH_METHOD.format(sizes="/".join(f"{s / 2**30:g}" for s in sizes) + " GiB", repeats=repeats)
    return Bandwidth(statistics.median(counted), min(counted), max(counted), method,
                     {size: statistics.median(v) for size, v in samples.items()})
