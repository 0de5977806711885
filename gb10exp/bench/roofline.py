"""The memory-bandwidth roofline of decoding.

One decode step must read every weight it uses once (the embedding table only by one row per token), so
at batch ``B`` decode can never exceed ``B * bandwidth / bytes_per_step`` tokens per second. Every
throughput run logs that bound and the fraction of it achieved. The bandwidth comes from the table of
published peaks below where the device is in it, otherwise from a copy measured on the spot (CPUs, GPUs
missing from the table); the measured copy bandwidth is logged on GPUs too, as a realistic ceiling.
A run on any other GPU also sees what the same bytes would give on GB10: a projection, not a
measurement, and labelled so; a CPU run makes none. A decode rate above the bound is tagged
``roofline=implausible`` with the reason (``roofline.reason``: e.g. CPU caches), never recorded as plausible.
"""

from __future__ import annotations

import functools
import time

import torch

GB10_GBPS = 273.0  # DGX Spark / GB10: 128 GB LPDDR5X, 256-bit, 8533 MT/s
# (substring of the device name as torch reports it, peak GB/s). First match wins: specific names first.
PEAK_BANDWIDTH_GBPS: tuple[tuple[str, float], ...] = (
    ("GB10", GB10_GBPS),
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # "NVIDIA H100 80GB HBM3": the SXM part
    ("H800", 3350.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # the 40 GB parts
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("RTX 5090", 1792.0),
    ("RTX 4090", 1008.0),
    ("T4", 320.0),
)
COPY_BYTES = {"cuda": 1 << 30, "cpu": 512 << 20}  # well past any last-level cache


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return "cpu"


def peak_bandwidth_gbps(name: str) -> float | None:
    """The published peak of a device by name, or None when it is not in the table."""
    for key, gbps in PEAK_BANDWIDTH_GBPS:
        if key.lower() in name.lower():
            return gbps
    return None


@functools.lru_cache(maxsize=8)
def measured_bandwidth_gbps(device: str, repeats: int = 5) -> float:
    """Best-of-``repeats`` device-to-device copy bandwidth (bytes read + bytes written per second)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():  # a remote or non-torch engine's GPU
        dev = torch.device("cpu")
    n = COPY_BYTES.get(dev.type, COPY_BYTES["cpu"]) // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    best = 0.0
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        dst.copy_(src)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = max(best, 2 * n * 4 / (time.perf_counter() - start))
    del src, dst
    return best / 1e9


def decode_step_bytes(model: torch.nn.Module, sizes: dict[int, float] | None = None) -> float:
    """Bytes one decode step reads: every distinct parameter once, except an input embedding table that is
    not also the output head (a token's embedding is one row of it, a few KB: ignored). ``sizes`` gives
    each parameter's bytes by ``data_ptr`` (``gb10exp.quant.bytes.tensor_bytes``: a deployed format's);
    by default, as stored in memory."""
    if sizes is None:
        sizes = {}
        for param in model.parameters():
            sizes.setdefault(param.data_ptr(), float(param.numel() * param.element_size()))
    total = sum(sizes.values())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is not None and (head is None or head.weight.data_ptr() != embed.weight.data_ptr()):
        total -= sizes.get(embed.weight.data_ptr(), 0.0)
    return float(total)


def torch_decode_bytes(model: torch.nn.Module) -> float:
    """Bytes one decode step of the in-memory PyTorch model reads (its weights as stored)."""
    return decode_step_bytes(model)


def decode_bound(bandwidth_gbps: float, decode_bytes: float, batch_size: int) -> float:
    """Tokens per second if every decode step only streamed the weights once at ``bandwidth_gbps``."""
    return batch_size * bandwidth_gbps * 1e9 / decode_bytes


def roofline_metrics(
    decode_tps: float | None, decode_bytes: float, batch_size: int, device: str
) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags): the bound, the achieved fraction, and the GB10 projection."""
    name = device_name(device)
    peak = peak_bandwidth_gbps(name)
    measured = measured_bandwidth_gbps(device)
    bandwidth = peak if peak is not None else measured
    bound = decode_bound(bandwidth, decode_bytes, batch_size)
    metrics = {"bandwidth_gbps": bandwidth, "bandwidth_measured_gbps": measured, "decode_bound_tokens_per_s": bound}
    tags = {"roofline.device": name,
            "roofline.bandwidth_source": "table (published peak)" if peak is not None else "measured copy"}
    if decode_tps is not None:
        fraction = decode_tps / bound
        metrics["roofline_fraction"] = fraction
        metrics["roofline_fraction_measured_bw"] = decode_tps / decode_bound(measured, decode_bytes, batch_size)
        if fraction > 1:
            tags |= {"roofline": "implausible", "roofline.reason": _implausible_reason(fraction, decode_bytes, name)}
        else:
            tags["roofline"] = "plausible"
        if fraction <= 1 and name != "cpu" and "GB10" not in name:
            gb10_bound = decode_bound(GB10_GBPS, decode_bytes, batch_size)
            metrics["gb10_decode_bound_tokens_per_s"] = gb10_bound
            metrics["gb10_projected_decode_tokens_per_s"] = gb10_bound * min(fraction, 1.0)
            tags["roofline.gb10"] = (f"projection, not a measurement: {GB10_GBPS:.0f} GB/s x the same bytes per "
                                     f"step x the fraction of the bound achieved on {name}")
        elif "GB10" not in name:
            tags["roofline.gb10"] = ("no projection: " + ("a CPU run says nothing about a GPU's fraction of its bound"
                                     if name == "cpu" else "the fraction of the bound is implausible"))
    return metrics, tags


def _implausible_reason(fraction: float, decode_bytes: float, name: str) -> str:
    """Why a decode rate above the memory-bandwidth bound cannot be taken at face value."""
    mib = decode_bytes / 2**20
    if name == "cpu":
        return (f"{fraction:.2f}x the bound: on a CPU, {mib:.0f} MiB of weights per step are partly served from "
                "caches, faster than the DRAM copy bandwidth the bound assumes")
    return (f"{fraction:.2f}x the bound at {name}'s bandwidth: the engine reads fewer bytes per step than the "
            f"{mib:.0f} MiB counted (smaller weights than its format's count, or weights kept in cache), or the "
            "bandwidth in the table is wrong")
