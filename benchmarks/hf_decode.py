"""In-process PyTorch decode speed against the memory-bandwidth roofline, several ways side by side.

    python benchmarks/hf_decode.py --shape llama3_1_8b --runs 3 --out 'benchmarks/results/hf_decode_{gpu}.json'
    python benchmarks/hf_decode.py --shape tiny --device cpu --out /tmp/hf_decode_tiny.json   # smoke test

Builds the model with random bf16 weights directly on the device (no download, no tokenizer: random
prompt token ids, whose speed is that of any tokens), then times, in one process and on the same
weights, each of ``--modes``: plain eager ``generate``, ``generate(cache_implementation="static")``, and
gb10exp's fast path (``gb10exp/backends/hf/fast.py``): ``fast`` is the default of
``backend=hf`` (Programmatic Dependent Launch chosen by timing both), ``fast_pdl`` / ``fast_nopdl``
with it forced on / off, ``fast_tuned`` its ``backend.options.tuned=true``; for diagnosis,
``fast_plain`` (no Inductor tuning), ``fast_whole`` (the whole step compiled as one graph instead of by
layer), ``fast_hf`` (the HF-forward step every non-Llama-like model gets) and
``fast_nograph`` (no CUDA graph). Every mode is warmed up first (compilation and capture reported as
``compile_s``, never as decode time), then each request decodes exactly ``--output-len`` tokens
greedily (EOS ignored) from its own prompt.

``--runs N`` repeats the whole measurement in N separate processes (GPU figures vary from process to
process by more than within one) and reports, per mode, the median over the runs and their range;
``--baseline-runs K`` measures the eager ``generate`` modes, minutes per run on a GPU, in the first K
runs only, so that three runs of the fast path fit one 10-minute device call.
The JSON (and a ``.log`` beside it with everything printed) records the command, the commit, the
machine, the library versions, the copy bandwidth (``hardware.measure_bandwidth``: median, range and
method), the bound, tokens/s, the fraction of the bound with the range the bandwidth's spread gives it,
and the compile: ``compile_s`` (never part of a speed figure) with what Inductor's caches gave
(``compile_stats``); ``{gpu}`` in ``--out`` becomes the GPU's short name (h100, h200; cpu).
``--compare-bandwidth-methods`` also times the copy the way the project did before issue 19 (one 1 GiB
copy, host clock, best of 5) and gives the fraction of the bound by each method.

Correctness, in every process (``--no-check-logits`` skips it): after timing a mode, its tokens for the
first prompt go through the reference (the transformers model, uncompiled, same weights) in one forward;
a fast mode decodes that prompt once more with the same compile plus a hook that keeps every step's
logits (``FastDecoder(record_logits=True)``, untimed), so the JSON has, per mode, the largest logit
difference from the reference in the same dtype, how often the reference's argmax is the token the mode
chose (and, where not, by how much the reference preferred its own: a near-tie), and for a bf16/fp16 run
the distance of both the mode and the reference from the float32 reference on the same tokens.

Needs only torch and transformers (the gb10exp modules it imports do not pull Hydra, MLflow or
modelopt), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository, without installing it

from gb10exp import hardware  # noqa: E402
from gb10exp.backends.hf.fast import FastDecoder, TokenStamper  # noqa: E402
from gb10exp.bench import Timing, now, summarize  # noqa: E402
from gb10exp.bench.monitor import Monitor  # noqa: E402
from gb10exp.bench.roofline import decode_bound  # noqa: E402
from gb10exp.models import random_llama  # noqa: E402
from gb10exp.quant import bytes as qbytes  # noqa: E402

SHAPES = {  # LlamaConfig keyword arguments
    "llama3_1_8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=512,
    ),
}
# mode -> FastDecoder keywords (fast modes) or None (transformers generate)
MODES: dict[str, dict | None] = {
    "generate": None,
    "static": None,
    "fast": {},
    "fast_tuned": {"tuned": True},  # backend.options.tuned=true: now the same compile as fast
    "fast_plain": {"preset": "plain"},
    "fast_pdl": {"pdl": True},  # the default compile, Programmatic Dependent Launch forced on
    "fast_nopdl": {"pdl": False},  # ... forced off (the default, pdl=auto, times both and keeps the faster)
    "fast_regional": {"regional": True},  # compiled by layer: the default since b415395, so the same as fast
    "fast_whole": {"regional": False},  # the whole step as one graph (the default until issue 19's cold start)
    # cold-start candidates (issue 19): no coordinate descent; the whole step, as measured in
    # benchmarks/results/cold_start_h100 (the by-layer default would otherwise make them by layer too)
    "fast_autotune": {"preset": "autotune", "regional": False},
    "fast_untuned": {"preset": "untuned", "regional": False},
    "fast_regional_autotune": {"regional": True, "preset": "autotune"},
    "fast_hf": {"native": False},
    "fast_nograph": {"cuda_graph": False},
}
KEYS = (
    "decode_tokens_per_s",
    "roofline_fraction_measured_bw",
    "roofline_fraction_measured_bw_lo",
    "roofline_fraction_measured_bw_hi",
    "roofline_fraction_old_method",
    "roofline_fraction",
    "ttft_s",
    "tpot_s",
    "itl_p90_s",
    "compile_s",
)  # summarised over runs: median and range


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    model = random_llama(
        SHAPES[shape]
        | {
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": 0,
        },
        0,
        device,
        dtype,
    )
    model.generation_config.eos_token_id = None  # random weights: nothing may stop a request early
    model.generation_config.pad_token_id = 0
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_runner(model, mode: str, output_len: int, device: torch.device):
    extra = {"cache_implementation": "static"} if mode == "static" else {}

    @torch.no_grad()
    def run(prompt: torch.Tensor) -> tuple[Timing, torch.Tensor]:
        sync(device)
        timing = Timing(start=now(), batch_size=prompt.shape[0])
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            streamer=TokenStamper(timing, device),
            **extra,
        )
        return timing, out[:, prompt.shape[1] :]

    return run


def measure_mode(model, mode: str, args, device: torch.device, prompts: list[torch.Tensor]) -> dict:
    start = time.perf_counter()
    decoder = None
    if MODES[mode] is not None:
        compile_step = {"auto": device.type == "cuda", "on": True, "off": False}[args.compile]
        options = {"cuda_graph": True} | MODES[mode]
        decoder = FastDecoder(
            model, args.batch_size, args.input_len, args.output_len, compile_step=compile_step, **options
        )
        decoder.warm(prompts[0])

        def run(prompt: torch.Tensor) -> tuple[Timing, torch.Tensor]:
            return decoder.generate(prompt), decoder.tokens.clone()

        first_tokens = None  # decoded again, with its logits, by check_fast_mode
    else:
        run = generate_runner(model, mode, args.output_len, device)
        first_tokens = run(prompts[0])[1]  # static: compiles here
    compile_s = time.perf_counter() - start
    for prompt in prompts[1 : 1 + args.warmup]:
        run(prompt)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings, tokens = [], None
    with Monitor(str(device)) as monitor:
        for prompt in prompts[1 + args.warmup :]:
            timing, out = run(prompt)
            timings.append(timing)
            tokens = out if tokens is None else tokens
    result = summarize(timings, args.input_len, args.output_len) | {"compile_s": compile_s}
    result["detail"] = decoder.describe() if decoder is not None else "transformers generate"
    result |= monitor.metrics() | {"tags": monitor.tags()}
    if device.type == "cuda":
        result["mem_torch_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["first_request_tokens"] = tokens[0, :16].tolist()
    if decoder is not None:
        result["compile_stats"] = decoder.compile_stats
        result["pdl"] = decoder.pdl
    if first_tokens is not None:
        result["_check_tokens"] = first_tokens
    if decoder is not None and args.profile and device.type == "cuda" and decoder.compiled:
        try:
            result["profile"] = profile_step(decoder, prompts[0])
        except Exception as exc:  # a diagnosis, never worth the figures
            print(f"profile failed: {type(exc).__name__}: {exc}", flush=True)
    if decoder is not None:
        decoder.close()  # the model's weights get their own storage back before the next mode
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


@torch.no_grad()
def check_fast_mode(model, mode: str, args, device: torch.device, prompt: torch.Tensor, pdl: bool):
    """The mode's step once more on ``prompt``, with the logits hook and the PDL setting the timed decoder
    kept (no second trial): (tokens (B, T), logits (B, T, V) float32). Untimed."""
    compile_step = {"auto": device.type == "cuda", "on": True, "off": False}[args.compile]
    options = {"cuda_graph": True} | MODES[mode] | {"pdl": pdl}
    with FastDecoder(
        model,
        args.batch_size,
        args.input_len,
        args.output_len,
        compile_step=compile_step,
        record_logits=True,
        **options,
    ) as decoder:
        decoder.warm(prompt)
        return decoder.decode_logits(prompt)


@torch.no_grad()
def reference_logits(model, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The reference's logits for each generated token (B, T, V), float32: the transformers model itself,
    uncompiled, in one forward over the prompt and the tokens the mode chose (teacher forcing)."""
    seq = torch.cat([prompt, tokens], dim=1)
    logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
    return logits[:, prompt.shape[1] - 1 : -1].float()


def compare_logits(logits: torch.Tensor | None, reference: torch.Tensor, tokens: torch.Tensor) -> dict:
    """How far a mode's logits are from the reference's, and whether the reference would have chosen the
    same tokens: where it would not, ``disagreement_max_gap`` is how much more it gave its own choice (a
    near-tie when small against the dtype's rounding, ``max_abs_diff``)."""
    best = reference.argmax(-1)
    agree = best == tokens
    gap = reference.gather(-1, best[..., None]) - reference.gather(-1, tokens[..., None])
    out = {
        "steps": int(tokens.shape[1]),
        "reference_logit_max_abs": float(reference.abs().max()),
        "argmax_agreement": float(agree.float().mean()),
        "first_disagreement_step": int((~agree).any(0).float().argmax()) if not bool(agree.all()) else None,
        "disagreement_max_gap": float(gap.max()) if not bool(agree.all()) else 0.0,
    }
    if logits is not None:
        diff = (logits - reference).abs()
        out |= {"max_abs_diff": float(diff.max()), "rms_diff": float(diff.pow(2).mean().sqrt())}
    return out


def old_method_gbps(device: torch.device, repeats: int = 5) -> float:
    """The copy bound as the project timed it before issue 19 (commit 30b0337, bench/roofline.py), kept only
    to show how far the method moves the figure: one 1 GiB fp32 copy, host clock around device syncs,
    best of ``repeats``."""
    n = (1 << 30) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = max(best, 2 * n * 4 / (time.perf_counter() - start))
    del src, dst
    return best / 1e9


@torch.no_grad()
def profile_step(decoder: FastDecoder, prompt: torch.Tensor, steps: int = 8) -> dict:
    """Kernels of one decode step (the compiled step launched without its graph: the same kernels),
    their count and summed time against the step's time in the graph: what the gaps cost."""
    from torch.profiler import ProfilerActivity, profile

    decoder._prefill(prompt)
    decoder.step_fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step_fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels) / steps
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:20]
    lines = [f"  {sum(t) / steps:9.1f} us/step  {len(t) / steps:5.1f}x  {name[:90]}" for name, t in top]
    print(
        f"profile: {len(kernels) / steps:.0f} kernels per step, {busy_us:.0f} us of kernel time per step",
        flush=True,
    )
    print("\n".join(lines), flush=True)
    return {
        "kernels_per_step": len(kernels) / steps,
        "kernel_us_per_step": busy_us,
        "top": [{"name": n[:200], "us_per_step": sum(t) / steps, "per_step": len(t) / steps} for n, t in top],
    }


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def machine_facts(device: str) -> dict[str, object]:
    """The GPU, its driver (nvidia-smi, where there is one), the host and its CPU count."""
    facts: dict[str, object] = {"device": device, "host": platform.node(), "cpu_count": os.cpu_count()}
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if smi.returncode == 0 and smi.stdout.strip():
            facts["driver"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


def gpu_short_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu' stays."""
    found = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return found.group(1).lower() if found else re.sub(r"\W+", "_", name).strip("_").lower()


def commit() -> str:
    """The commit measured: GB10EXP_COMMIT when given (a copied tree has no .git), else git's, + dirty."""
    if os.environ.get("GB10EXP_COMMIT"):
        return os.environ["GB10EXP_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "gb10exp", "benchmarks/hf_decode.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git; set GB10EXP_COMMIT)"


def measure(args) -> dict:
    """One process: build the model, measure every mode, return the report of this run."""
    device = torch.device(args.device)
    model = build_model(args.shape, device, getattr(torch, args.dtype))
    weights = qbytes.decode_step_bytes(qbytes.from_module(model, dense_bits=None))
    name = hardware.name(device)
    row = hardware.spec(name) if name != "cpu" else None
    bandwidth = hardware.measure_bandwidth(str(device))
    peak, measured = row.peak_gbps if row else None, bandwidth.gbps
    bound_peak = decode_bound(peak, weights, args.batch_size) if peak else None
    bound_measured = decode_bound(measured, weights, args.batch_size)
    old_gbps = old_method_gbps(device) if args.compare_bandwidth_methods else None
    generator = torch.Generator().manual_seed(1)
    count = 1 + args.warmup + args.repeats
    prompts = [
        torch.randint(0, model.config.vocab_size, (args.batch_size, args.input_len), generator=generator).to(
            device
        )
        for _ in range(count)
    ]  # a fresh prompt per request

    results, failed = {}, {}
    for mode in args.modes:
        print(f"measuring {mode} ...", flush=True)
        try:
            r = results[mode] = measure_mode(model, mode, args, device, prompts)
        except Exception as exc:  # one broken mode must not cost the others' figures
            traceback.print_exc()
            failed[mode] = f"{type(exc).__name__}: {exc}"[:500]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        tps = r["decode_tokens_per_s"]
        r["roofline_fraction"] = tps / bound_peak if bound_peak else None
        r["roofline_fraction_measured_bw"] = tps / bound_measured
        # The bound's spread carried into the fraction: the fastest copy gives the smallest fraction.
        r["roofline_fraction_measured_bw_lo"] = tps / decode_bound(bandwidth.hi, weights, args.batch_size)
        r["roofline_fraction_measured_bw_hi"] = tps / decode_bound(bandwidth.lo, weights, args.batch_size)
        if old_gbps is not None:
            r["roofline_fraction_old_method"] = tps / decode_bound(old_gbps, weights, args.batch_size)
        if args.check_logits and MODES[mode] is not None:
            try:
                r["_check_tokens"], r["_check_logits"] = check_fast_mode(
                    model, mode, args, device, prompts[0], r["pdl"]
                )
            except Exception as exc:  # the figures stand without it; the JSON says it failed
                traceback.print_exc()
                r["logit_check"] = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
        print(
            f"  {mode}: {r['decode_tokens_per_s']:.1f} tok/s ({100 * r['roofline_fraction_measured_bw']:.1f}% "
            f"of the copy bound), compile {r['compile_s']:.1f} s; {r['detail']}",
            flush=True,
        )
    if args.check_logits:
        check_against_reference(model, results, prompts[0])
    return {
        "device": name,
        "bandwidth_peak_gbps": peak,
        # Each mode's tokens are the reference's own argmax at every step (None: not checked). Decided per
        # mode against the reference in this process, never between modes: one mode alone is checked too.
        "greedy_tokens_agree": agree(results) if args.check_logits else None,
        "bandwidth_measured_gbps": measured,
        "bandwidth_measured_lo_gbps": bandwidth.lo,
        "bandwidth_measured_hi_gbps": bandwidth.hi,
        "bandwidth_method": bandwidth.method,
        "bandwidth_by_size_gbps": {f"{size / 2**30:g} GiB": v for size, v in bandwidth.by_size.items()},
        "bandwidth_old_method_gbps": old_gbps,
        "decode_bytes_per_token": weights,
        "decode_bound_tokens_per_s": bound_peak,
        "decode_bound_measured_bw_tokens_per_s": bound_measured,
        "modes": results,
        "failed": failed,
    }


def agree(results: dict) -> bool:
    return all(
        r["logit_check"]["argmax_agreement"] == 1.0
        for r in results.values()
        if "steps" in r.get("logit_check", {})
    )


@torch.no_grad()
def check_against_reference(model, results: dict, prompt: torch.Tensor) -> None:
    """Each mode's tokens (and a fast mode's logits) against the reference, in the model's dtype; then,
    for a 16-bit model, both against the float32 reference on the same tokens, with the weights upcast in
    place (exact: every bf16 value is a float32 value) once every mode is done with them."""
    checked = {m: r for m, r in results.items() if "_check_tokens" in r}
    for r in checked.values():
        tokens, logits = r.pop("_check_tokens"), r.pop("_check_logits", None)
        reference = reference_logits(model, prompt, tokens)
        r["logit_check"] = compare_logits(logits, reference, tokens)
        r["_kept"] = (tokens, None if logits is None else logits.cpu(), reference.cpu())
    if next(model.parameters()).dtype != torch.float32 and checked:
        model.float()
        for r in checked.values():
            tokens, logits, reference = r["_kept"]
            fp32 = reference_logits(model, prompt, tokens).cpu()
            r["logit_check"]["reference_max_abs_diff_vs_fp32"] = float((reference - fp32).abs().max())
            if logits is not None:
                r["logit_check"]["max_abs_diff_vs_fp32"] = float((logits - fp32).abs().max())
    for r in checked.values():
        del r["_kept"]


def spread(values: list[float]) -> dict[str, float | list[float]]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def aggregate(runs: list[dict], modes: list[str]) -> dict:
    """Per mode: every KEYS figure as the median over runs (the headline) and its range."""
    out = {}
    for mode in modes:
        per_run = [r["modes"][mode] for r in runs if mode in r["modes"]]
        if not per_run:
            continue
        m = {k: statistics.median([p[k] for p in per_run]) for k in KEYS if per_run[0].get(k) is not None}
        m["over_runs"] = {k: spread([p[k] for p in per_run]) for k in KEYS if k in m}
        m["detail"] = per_run[0]["detail"]
        checks = [p["logit_check"] for p in per_run if "steps" in p.get("logit_check", {})]
        if checks:  # the worst run of each figure
            worst = {"runs": len(checks), "argmax_agreement_min": min(c["argmax_agreement"] for c in checks)}
            for key in (
                "max_abs_diff",
                "max_abs_diff_vs_fp32",
                "reference_max_abs_diff_vs_fp32",
                "disagreement_max_gap",
            ):
                if all(key in c for c in checks):
                    worst[key + "_max"] = max(c[key] for c in checks)
            m["logit_check"] = worst
        out[mode] = m
    return out


def check_lines(modes: dict) -> list[str]:
    """The reference comparison, one line per mode (worst of the runs)."""
    lines = []
    for mode, r in modes.items():
        c = r.get("logit_check")
        if c is None:
            continue
        text = f"  {mode}: reference's argmax = the mode's token at >= {100 * c['argmax_agreement_min']:.1f}% of steps"
        if c["argmax_agreement_min"] < 1:
            text += f" (where not, the reference preferred its own by <= {c['disagreement_max_gap_max']:.4f})"
        if "max_abs_diff_max" in c:
            text += f"; max |logit - reference| {c['max_abs_diff_max']:.4f}"
        if "max_abs_diff_vs_fp32_max" in c:
            text += (
                f"; vs the float32 reference: mode {c['max_abs_diff_vs_fp32_max']:.4f}, "
                f"eager reference {c['reference_max_abs_diff_vs_fp32_max']:.4f}"
            )
        lines.append(text + f" ({c['runs']} run(s))")
    return lines


def table(modes: dict) -> str:
    """Medians over runs with their ranges; "% copy" is the fraction of the copy bound, and "bw spread"
    the range the bandwidth's own spread (its single copies, each run) gives that fraction."""
    head = (
        f"{'mode':<13}{'tok/s':>9}{'range':>16}{'% copy':>8}{'range':>14}{'bw spread':>13}{'old method':>11}"
        f"{'TTFT ms':>9}{'TPOT ms':>9}{'compile s':>11}{'range':>13}{'runs':>6}"
    )
    lines = [head, "-" * len(head)]
    for mode, r in modes.items():
        o = r["over_runs"]
        t, f, c = o["decode_tokens_per_s"], o["roofline_fraction_measured_bw"], o["compile_s"]
        t_range, f_range = f"{t['min']:.1f}-{t['max']:.1f}", f"{100 * f['min']:.1f}-{100 * f['max']:.1f}"
        bw = f"{100 * o['roofline_fraction_measured_bw_lo']['min']:.1f}-{100 * o['roofline_fraction_measured_bw_hi']['max']:.1f}"
        old = f"{100 * r['roofline_fraction_old_method']:.1f}" if "roofline_fraction_old_method" in r else "-"
        lines.append(
            f"{mode:<13}{t['median']:>9.1f}{t_range:>16}{100 * f['median']:>8.1f}{f_range:>14}{bw:>13}{old:>11}"
            f"{1e3 * r['ttft_s']:>9.1f}{1e3 * r['tpot_s']:>9.2f}{c['median']:>11.1f}"
            f"{c['min']:>6.1f}-{c['max']:<6.1f}{len(t['runs']):>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3_1_8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--runs", type=int, default=1, help="separate processes; figures are medians over them"
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="start no run that would end after this many seconds, judged by the last run's length",
    )
    parser.add_argument("--modes", default="generate,static,fast", help=f"comma-separated, of {list(MODES)}")
    parser.add_argument(
        "--baseline-runs",
        type=int,
        default=None,
        help="measure the transformers generate modes (the slow reference) in the first N runs only; "
        "default: in every run",
    )
    parser.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="compile the fast path's decode step (auto: on CUDA only)",
    )
    parser.add_argument("--out", required=True, help="JSON file to write; {gpu} becomes the GPU's short name")
    parser.add_argument(
        "--profile", action="store_true", help="list the kernels of a compiled fast step (CUDA)"
    )
    parser.add_argument(
        "--no-check-logits",
        dest="check_logits",
        action="store_false",
        help="skip the comparison of every mode with the reference model (logits and tokens)",
    )
    parser.add_argument(
        "--compare-bandwidth-methods",
        action="store_true",
        help="also time the copy as before issue 19 (1 GiB, host clock, best of 5) and give the fraction "
        "of the bound by each method",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one run of --runs
    args = parser.parse_args(argv)
    args.modes = args.modes.split(",")
    if bad := [m for m in args.modes if m not in MODES]:
        parser.error(f"--modes {bad} not allowed: of {list(MODES)}")
    if args.runs < 1:
        parser.error(f"--runs {args.runs} not allowed: 1 or more")
    if args.baseline_runs is not None and not 1 <= args.baseline_runs <= args.runs:
        parser.error(f"--baseline-runs {args.baseline_runs} not allowed: 1 to --runs ({args.runs})")
    fast_modes = [m for m in args.modes if MODES[m] is not None]
    if args.baseline_runs is not None and args.baseline_runs < args.runs and not fast_modes:
        parser.error(f"--baseline-runs {args.baseline_runs} needs a fast mode in --modes {args.modes}")
    if args.child:
        report = measure(args)
        Path(args.out).write_text(json.dumps(report, indent=2))
        return report

    started, log = time.perf_counter(), []

    def say(text: str) -> None:
        print(text, flush=True)
        log.append(text)

    command = shlex.join(
        [Path(sys.argv[0]).name if argv is None else "hf_decode.py", *(argv or sys.argv[1:])]
    )
    runs: list[dict] = []
    if args.runs == 1:
        runs.append(measure(args))
    else:
        forward = [a for a in (argv if argv is not None else sys.argv[1:])]
        last_s = 0.0
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                # Start a run only when one more, as long as the last, still ends before the deadline.
                elapsed = time.perf_counter() - started
                if args.deadline_s is not None and runs and elapsed + last_s > args.deadline_s:
                    say(f"deadline: {len(runs)} of {args.runs} runs done, no further run started")
                    break
                part = Path(tmp) / f"run{i}.json"
                child = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    *[a for a in forward if a != "--profile" or i == args.runs - 1],  # profiled: the last run
                    "--child",
                    "--out",
                    str(part),
                ]
                if args.baseline_runs is not None and i >= args.baseline_runs:
                    child += ["--modes", ",".join(fast_modes)]  # the last --modes wins
                say(f"run {i + 1}/{args.runs} (separate process), {elapsed:.0f} s in")
                run_start = time.perf_counter()
                # Streamed line by line, so a run cut short by a time limit still shows how far it got.
                with subprocess.Popen(
                    child, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                ) as got:
                    for line in got.stdout:
                        say("  | " + line.rstrip())
                if got.returncode != 0:
                    say(f"run {i + 1} failed with exit status {got.returncode}")
                    continue
                runs.append(json.loads(part.read_text()))
                last_s = time.perf_counter() - run_start
                if i + 1 < args.runs:  # a partial file now; the full one at the end
                    write_report(args, runs, command, log[:], started, lambda text: None)
    if not runs:
        raise SystemExit("no run finished")
    return write_report(args, runs, command, log, started, say)


def write_report(args, runs: list[dict], command: str, log: list[str], started: float, say) -> dict:
    """Summarise the runs done so far into the JSON and its .log (after every run, so a run cut short
    by a time limit still leaves the runs before it)."""
    first = runs[0]
    modes = aggregate(runs, args.modes)
    bound = statistics.median([r["decode_bound_measured_bw_tokens_per_s"] for r in runs])
    bandwidth = spread([r["bandwidth_measured_gbps"] for r in runs])
    low, high = (
        min(r["bandwidth_measured_lo_gbps"] for r in runs),
        max(r["bandwidth_measured_hi_gbps"] for r in runs),
    )
    say(
        f"\n{first['device']}: {first['decode_bytes_per_token'] / 1e9:.2f} GB read per decode step; copy bandwidth "
        f"{bandwidth['median']:.0f} GB/s (median of the {len(runs)} runs' medians, "
        f"{bandwidth['min']:.0f}-{bandwidth['max']:.0f}; single copies {low:.0f}-{high:.0f}) "
        f"-> bound {bound:.1f} tok/s; batch {args.batch_size}, {args.input_len} + {args.output_len} tokens, {args.dtype}"
    )
    say(f"bandwidth method: {first['bandwidth_method']}")
    old = [r["bandwidth_old_method_gbps"] for r in runs if r.get("bandwidth_old_method_gbps")]
    if old:
        say(
            f"the method before issue 19 (1 GiB, host clock, best of 5) read {min(old):.0f}-{max(old):.0f} GB/s "
            f"in the same processes: {', '.join(f'{v:.0f}' for v in old)}"
        )
    for i, r in enumerate(runs):
        for mode, error in r.get("failed", {}).items():
            say(f"run {i + 1}: {mode} failed: {error}")
    say(f"median over {len(runs)} run(s) in separate processes, range min-max:")
    say(table(modes))
    checks = check_lines(modes)
    if checks:
        say("against the reference (transformers, uncompiled, same weights, the mode's own tokens):")
        for line in checks:
            say(line)
    machine = machine_facts(first["device"])
    report = {
        "command": command,
        "commit": commit(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "device": first["device"],
        "shape": args.shape,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "runs_requested": args.runs,
        "runs_done": len(runs),
        "decode_bytes_per_token": first["decode_bytes_per_token"],
        "bandwidth_peak_gbps": first["bandwidth_peak_gbps"],
        "bandwidth_measured_gbps": bandwidth,
        "bandwidth_measured_single_copies_gbps": {"min": low, "max": high},
        "bandwidth_method": first["bandwidth_method"],
        "decode_bound_tokens_per_s": first["decode_bound_tokens_per_s"],
        "decode_bound_measured_bw_tokens_per_s": bound,
        "versions": versions(),
        "greedy_tokens_agree": None if None in (g := [r["greedy_tokens_agree"] for r in runs]) else all(g),
        "modes": modes,
        "per_run": runs,
    }
    if "fast" in modes and "fast_tuned" in modes:
        report["tuned_over_default"] = (
            modes["fast_tuned"]["decode_tokens_per_s"] / modes["fast"]["decode_tokens_per_s"]
        )
    if "fast" in modes and "generate" in modes:
        report["fast_over_generate"] = (
            modes["fast"]["decode_tokens_per_s"] / modes["generate"]["decode_tokens_per_s"]
        )
    out = Path(args.out.replace("{gpu}", gpu_short_name(first["device"])))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    say(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    header = (
        f"$ {command}\ncommit {report['commit']} · {report['date_utc']} · {machine['device']} "
        f"(driver {machine.get('driver', '?')}) · {platform.node()}\n"
        + " ".join(f"{k} {v}" for k, v in report["versions"].items())
        + "\n"
    )
    out.with_suffix(".log").write_text(header + "\n".join(log) + "\n")
    return report


if __name__ == "__main__":
    main()
