"""In-process PyTorch decode speed against the memory-bandwidth roofline, three ways side by side.

    python benchmarks/hf_decode.py --shape llama3_1_8b --device cuda --out benchmarks/results/hf_decode_h100.json
    python benchmarks/hf_decode.py --shape tiny --device cpu --out /tmp/hf_decode_tiny.json   # smoke test

Builds the model with random bf16 weights directly on the device (no download, no tokenizer: random
prompt token ids, whose speed is that of any tokens), then times, in one process and on the same
weights: plain eager ``generate``, ``generate(cache_implementation="static")``, and gb10exp's fast path
(StaticCache, decode step compiled and captured in a CUDA graph; ``gb10exp/backends/hf/fast.py``).
Every mode is warmed up first (compilation and capture reported as ``compile_s``, never as decode
time), then each request decodes exactly ``--output-len`` tokens greedily (EOS ignored) from its own
prompt. Prints a table and writes JSON with every figure, the device, the bandwidths and the clocks.

Needs only torch and transformers (the gb10exp modules it imports do not pull Hydra, MLflow or
modelopt). Reference (H100 80GB HBM3, torch 2.11, transformers 5.17, bf16, batch 1): plain generate
36 tok/s, static 113, a quick compiled loop 129, bound ~188 at measured copy bandwidth; the fast path
aims at >= 75% of the bound.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, without installing it

from gb10exp.backends.hf.fast import FastDecoder, TokenStamper  # noqa: E402
from gb10exp.bench import Timing, now, summarize  # noqa: E402
from gb10exp.bench.monitor import Monitor  # noqa: E402
from gb10exp.bench.roofline import (  # noqa: E402
    decode_bound,
    device_name,
    measured_bandwidth_gbps,
    peak_bandwidth_gbps,
    torch_decode_bytes,
)

SHAPES = {  # LlamaConfig keyword arguments
    "llama3_1_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                        rope_theta=500000.0, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512),
}
MODES = ("generate", "static", "fast", "fast_tuned", "fast_nograph")


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], architectures=["LlamaForCausalLM"], bos_token_id=None, eos_token_id=None,
                         pad_token_id=0)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: an fp32 8B model would need 32 GB first
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
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
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, streamer=TokenStamper(timing, device), **extra)
        return timing, out[:, prompt.shape[1]:]

    return run


def fast_runner(model, args, device: torch.device, graph: bool, tuned: bool = False):
    compile_step = {"auto": device.type == "cuda", "on": True, "off": False}[args.compile]
    decoder = FastDecoder(model, args.batch_size, args.input_len, args.output_len, compile_step, graph, tuned=tuned)

    def run(prompt: torch.Tensor) -> tuple[Timing, torch.Tensor]:
        timing = decoder.generate(prompt)
        return timing, decoder.tokens.clone()

    return decoder, run


def measure_mode(model, mode: str, args, device: torch.device, prompts: list[torch.Tensor]) -> dict:
    start = time.perf_counter()
    if mode.startswith("fast"):
        decoder, run = fast_runner(model, args, device, graph=mode != "fast_nograph", tuned=mode == "fast_tuned")
        decoder.warm(prompts[0])
        detail = f"{'compiled' if decoder.step_fn is not decoder._step else 'eager'} step, " \
                 f"{'CUDA graph' if decoder.graph is not None else 'no graph'}"
    else:
        run, detail = generate_runner(model, mode, args.output_len, device), "transformers generate"
        run(prompts[0])  # static: compiles here
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
    result = summarize(timings, args.input_len, args.output_len) | {"compile_s": compile_s, "detail": detail}
    result |= monitor.metrics() | {"tags": monitor.tags()}
    if device.type == "cuda":
        result["mem_torch_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["first_request_tokens"] = tokens[0, :16].tolist()
    del run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def table(results: dict, bound_peak: float | None, bound_measured: float) -> str:
    head = f"{'mode':<13}{'TTFT ms':>9}{'tok/s':>9}{'TPOT ms':>9}{'p90 ITL':>9}{'% peak':>8}{'% copy':>8}{'compile s':>11}"
    lines = [head, "-" * len(head)]
    for mode, r in results.items():
        tps = r.get("decode_tokens_per_s", float("nan"))
        peak = f"{100 * tps / bound_peak:.1f}" if bound_peak else "-"
        lines.append(f"{mode:<13}{1e3 * r['ttft_s']:>9.1f}{tps:>9.1f}{1e3 * r.get('tpot_s', float('nan')):>9.2f}"
                     f"{1e3 * r.get('itl_p90_s', float('nan')):>9.2f}{peak:>8}"
                     f"{100 * tps / bound_measured:>8.1f}{r['compile_s']:>11.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3_1_8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="generate,static,fast", help=f"comma-separated, of {list(MODES)}")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="compile the fast path's decode step (auto: on CUDA only)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if bad := [m for m in modes if m not in MODES]:
        parser.error(f"--modes {bad} not allowed: of {list(MODES)}")

    device = torch.device(args.device)
    model = build_model(args.shape, device, getattr(torch, args.dtype))
    weights = torch_decode_bytes(model)
    name = device_name(str(device))
    peak, measured = peak_bandwidth_gbps(name), measured_bandwidth_gbps(str(device))
    bound_peak = decode_bound(peak, weights, args.batch_size) if peak else None
    bound_measured = decode_bound(measured, weights, args.batch_size)
    generator = torch.Generator().manual_seed(1)
    count = 1 + args.warmup + args.repeats
    prompts = [torch.randint(0, model.config.vocab_size, (args.batch_size, args.input_len), generator=generator)
               .to(device) for _ in range(count)]  # a fresh prompt per request

    results = {}
    for mode in modes:
        print(f"measuring {mode} ...", flush=True)
        results[mode] = measure_mode(model, mode, args, device, prompts)
    print(f"\n{name}: {weights / 1e9:.2f} GB read per decode step; bound {bound_peak or float('nan'):.1f} tok/s at "
          f"peak {peak} GB/s (table), {bound_measured:.1f} tok/s at measured copy {measured:.0f} GB/s")
    print(table(results, bound_peak, bound_measured))
    report = {
        "device": name, "shape": args.shape, "dtype": args.dtype, "batch_size": args.batch_size,
        "input_len": args.input_len, "output_len": args.output_len, "warmup": args.warmup, "repeats": args.repeats,
        "decode_bytes_per_token": weights, "bandwidth_peak_gbps": peak, "bandwidth_measured_gbps": measured,
        "decode_bound_tokens_per_s": bound_peak, "decode_bound_measured_bw_tokens_per_s": bound_measured,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "modes": results,
    }
    for r in results.values():
        if "decode_tokens_per_s" in r:
            r["roofline_fraction"] = r["decode_tokens_per_s"] / bound_peak if bound_peak else None
            r["roofline_fraction_measured_bw"] = r["decode_tokens_per_s"] / bound_measured
    if "fast" in results and "generate" in results:
        report["fast_over_generate"] = results["fast"]["decode_tokens_per_s"] / results["generate"]["decode_tokens_per_s"]
    first = [r["first_request_tokens"] for r in results.values()]
    # Compiled kernels round differently from eager ones, so with random weights greedy paths may part
    # after a few tokens; a mismatch from the first token on would mean a broken path.
    report["greedy_tokens_agree"] = all(f == first[0] for f in first)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
