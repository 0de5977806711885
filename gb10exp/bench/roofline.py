"""The memory-bandwidth roofline of decoding.

A decode step must read what ``gb10exp.quant.bytes.decode_step_bytes`` counts (the weights, the KV cache
of the context), so at batch ``B`` decode can never exceed ``B * bandwidth / bytes_per_step`` tokens per
second. Every throughput run logs that bound and the fraction of it achieved, against the device's
published peak where ``gb10exp.hardware`` knows it, and always against the copy bandwidth measured on the
spot (``hardware.measure_bandwidth``: one method, recorded with its range). A run on any other GPU also
sees what the same bytes would give on GB10: a projection, not a measurement, and labelled so; a CPU run
makes none. A decode rate above the bound is tagged ``roofline=implausible`` with the reason
(``roofline.reason``: e.g. CPU caches), never recorded as plausible.
"""

from __future__ import annotations

from gb10exp import hardware
from gb10exp.quant.bytes import Tensors, decode_step_bytes


def decode_bound(bandwidth_gbps: float, bytes_per_step: float, batch_size: int = 1) -> float:
    """Tokens per second if every decode step only streamed ``bytes_per_step`` once at ``bandwidth_gbps``."""
    return batch_size * bandwidth_gbps * 1e9 / bytes_per_step


def roofline_metrics(decode_tps: float | None, tensors: Tensors, context: float, batch_size: int,
                     device: str) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags): the bytes per step, the bound at the peak and at the measured bandwidth, the achieved
    fractions, and the GB10 projection. ``context``: the mean tokens in each sequence's KV cache while the
    measured tokens were decoded."""
    name = hardware.name(device)
    row = hardware.spec(name) if name != "cpu" else None
    measured = hardware.measure_bandwidth(device)
    weights = decode_step_bytes(tensors)
    step = decode_step_bytes(tensors, context, batch_size)
    bandwidth = row.peak_gbps if row is not None else measured.gbps
    bound = decode_bound(bandwidth, step, batch_size)
    metrics = {"decode_bytes_per_token": weights, "decode_kv_bytes": step - weights, "bandwidth_gbps": bandwidth,
               "bandwidth_measured_gbps": measured.gbps, "bandwidth_measured_lo_gbps": measured.lo,
               "bandwidth_measured_hi_gbps": measured.hi, "decode_bound_tokens_per_s": bound}
    tags = {"roofline.device": name, "roofline.bytes_source": tensors.source,
            "roofline.bandwidth_source": "published peak (gb10exp/hardware.py)" if row is not None else "measured copy",
            "roofline.context": f"{context:g} tokens of KV cache per sequence (bench.depth + input + half the output)",
            **measured.tags("roofline.bandwidth_measured")}
    if decode_tps is None:
        return metrics, tags
    fraction = decode_tps / bound
    metrics |= {"roofline_fraction": fraction,
                "roofline_fraction_measured_bw": decode_tps / decode_bound(measured.gbps, step, batch_size)}
    tags |= ({"roofline": "implausible", "roofline.reason": _implausible_reason(fraction, step, name)}
             if fraction > 1 else {"roofline": "plausible"})
    if row is hardware.GB10:
        return metrics, tags
    if fraction <= 1 and name != "cpu":
        gb10_bound = decode_bound(hardware.GB10.peak_gbps, step, batch_size)
        metrics["gb10_decode_bound_tokens_per_s"] = gb10_bound
        metrics["gb10_projected_decode_tokens_per_s"] = gb10_bound * fraction
        tags["roofline.gb10"] = (f"projection, not a measurement: {hardware.GB10.peak_gbps:.0f} GB/s x the same bytes "
                                 f"per step x the fraction of the bound achieved on {name}")
    else:
        tags["roofline.gb10"] = "no projection: " + ("a CPU run says nothing about a GPU's fraction of its bound"
                                                     if name == "cpu" else "the fraction of the bound is implausible")
    return metrics, tags


def _implausible_reason(fraction: float, step_bytes: float, name: str) -> str:
    """Why a decode rate above the memory-bandwidth bound cannot be taken at face value."""
    mib = step_bytes / 2**20
    if name == "cpu":
        return (f"{fraction:.2f}x the bound: on a CPU, {mib:.0f} MiB of weights per step are partly served from "
                "caches, faster than the DRAM copy bandwidth the bound assumes")
    return (f"{fraction:.2f}x the bound at {name}'s bandwidth: the engine reads fewer bytes per step than the "
            f"{mib:.0f} MiB counted (smaller weights than its format's count, or weights kept in cache), or the "
            "bandwidth in the table is wrong")
