"""What the machine did while a measurement ran: GPU clocks, power, throttle reasons, memory.

A background thread samples every ``INTERVAL_S`` while the recorded repetitions run. NVML may be absent
(CPU machines, containers without the driver library) or answer "Not Supported" for single queries (GB10
reports no memory figure at all, its memory being unified): each query that fails is left out and named
in the ``nvml`` tag, and nothing ever raises. System memory is ``MemTotal - MemAvailable`` from
/proc/meminfo, which unlike ``cudaMemGetInfo`` on GB10 does not count reclaimable page cache as used.
A run whose SM clock fell by more than ``THROTTLE_DROP`` during the measurement is tagged throttled.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import statistics
import threading
from pathlib import Path

INTERVAL_S = 0.05
THROTTLE_DROP = 0.15  # min SM clock below (1 - this) x max SM clock during the measurement: throttled
# NVML's throttle ("clocks event") reason bits worth naming; idle and application-clock bits are left out.
REASONS = {"sw_power_cap": 0x4, "hw_slowdown": 0x8, "sync_boost": 0x10, "sw_thermal": 0x20,
           "hw_thermal": 0x40, "hw_power_brake": 0x80}


def system_used_bytes() -> float | None:
    """``MemTotal - MemAvailable`` (bytes), or None where /proc/meminfo is not there."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(fields["MemTotal"].split()[0]) - int(fields["MemAvailable"].split()[0])) * 1024.0
    except (OSError, KeyError, ValueError):
        return None


def _nvml_index(device: str) -> int:
    """NVML's index of a torch device: NVML ignores CUDA_VISIBLE_DEVICES, so match by UUID when possible."""
    import torch

    index = torch.device(device).index or 0
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            import pynvml

            for i in range(pynvml.nvmlDeviceGetCount()):
                handle_uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
                if str(handle_uuid).removeprefix("GPU-") == uuid.removeprefix("GPU-"):
                    return i
    return index


class _Nvml:
    """One GPU's NVML queries; every query that fails once is dropped and remembered in ``unsupported``."""

    def __init__(self, device: str):
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(device))
        self.unsupported: set[str] = set()
        # Renamed from "ClocksThrottleReasons" in newer drivers' bindings; either may be present.
        reasons = (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                   or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        self.queries = {
            "sm_clock_mhz": lambda h: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda h: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "power_w": lambda h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "temp_c": lambda h: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "reasons": reasons,
            "mem_used_bytes": lambda h: float(pynvml.nvmlDeviceGetMemoryInfo(h).used),
        }

    def sample(self) -> dict[str, float]:
        out = {}
        for name, query in self.queries.items():
            if name in self.unsupported:
                continue
            try:
                out[name] = float(query(self.handle))
            except Exception:  # NVMLError_NotSupported and kin: GB10 has no memory figure, VMs lack clocks
                self.unsupported.add(name)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nv.nvmlShutdown()


class Monitor:
    """``with Monitor(device) as m: ...`` samples in the background; then ``m.metrics()``, ``m.tags()``."""

    def __init__(self, device: str):
        self.device = device
        self.samples: list[dict[str, float]] = []
        self.nvml: _Nvml | None = None
        self.nvml_status = "not used (CPU)"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        if self.device.startswith("cuda"):
            try:
                self.nvml = _Nvml(self.device)
                self.nvml_status = "ok"
            except Exception as exc:  # no driver library, no permission: measure on without it
                self.nvml_status = f"absent ({type(exc).__name__})"
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self.nvml is not None:
            if self.nvml.unsupported:
                self.nvml_status = "ok; not supported: " + ",".join(sorted(self.nvml.unsupported))
            self.nvml.close()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        sample = self.nvml.sample() if self.nvml is not None else {}
        if (used := system_used_bytes()) is not None:
            sample["system_used_bytes"] = used
        self.samples.append(sample)

    def _series(self, key: str) -> list[float]:
        return [s[key] for s in self.samples if key in s]

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if used := self._series("system_used_bytes"):
            out["mem_system_used_peak_gib"] = max(used) / 2**30
        if gpu_used := self._series("mem_used_bytes"):
            out["mem_gpu_used_peak_gib"] = max(gpu_used) / 2**30  # NVML; counts other processes too
        if clocks := self._series("sm_clock_mhz"):
            out |= {"gpu_sm_clock_mhz_min": min(clocks), "gpu_sm_clock_mhz_median": statistics.median(clocks),
                    "gpu_sm_clock_mhz_max": max(clocks)}
        if mem_clocks := self._series("mem_clock_mhz"):
            out["gpu_mem_clock_mhz_min"] = min(mem_clocks)
        if power := self._series("power_w"):
            out |= {"gpu_power_w_mean": statistics.fmean(power), "gpu_power_w_max": max(power)}
        if temp := self._series("temp_c"):
            out["gpu_temp_c_max"] = max(temp)
        return out

    def tags(self) -> dict[str, str]:
        tags = {"nvml": self.nvml_status}
        if clocks := self._series("sm_clock_mhz"):
            tags["gpu_throttled"] = str(min(clocks) < (1 - THROTTLE_DROP) * max(clocks)).lower()
        elif self.device.startswith("cuda"):
            tags["gpu_throttled"] = "unknown (no SM clock from NVML)"
        if reasons := self._series("reasons"):
            bits = functools.reduce(operator.or_, (int(r) for r in reasons))
            tags["gpu_throttle_reasons"] = ",".join(n for n, b in REASONS.items() if bits & b) or "none"
        return tags
