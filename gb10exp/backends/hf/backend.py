"""In-process PyTorch/transformers, three ways to decode (``backend.options.mode``): ``fast`` (the default:
StaticCache + a decode step compiled and captured in one CUDA graph, ``fast.py``, eager on a CPU; it measures
the hardware, not Python), ``static`` (``generate(cache_implementation="static")``) and ``generate`` (plain
eager, mostly Python overhead on a GPU). ``options.compare`` times more modes in the same run, metrics
``<mode>.*``. Fake-quantized models are not timed unless ``bench.measure_fake_quant=true``: their speed is the
simulation's, not the format's.
"""

from __future__ import annotations

import time

import torch

from gb10exp.backends.base import Backend, BenchInputs
from gb10exp.backends.hf.config import HFOptions
from gb10exp.backends.hf.fast import FastDecoder, TokenStamper
from gb10exp.bench import Target, Timing, measure, now
from gb10exp.config import BenchConfig, ConfigError
from gb10exp.quant import bytes as qbytes
from gb10exp.quant.formats import Format


class HFBackend(Backend):  # Backend's perplexity: None, the offline evaluation ran through this very model
    name = "hf"
    served_model = None  # runs the configured model
    engine_package = None  # torch and transformers: already in every run's identity

    def __init__(self, options: HFOptions):
        self.modes = [options.mode, *[m for m in options.compare if m != options.mode]]
        self.options = options

    def check(self, fmt: Format, tokenizer=None) -> None:
        if fmt.kind == "gguf":
            raise ConfigError(f"qformat={fmt.name!r} is not allowed with backend=hf: llama.cpp quantizes it; "
                              "use backend=llamacpp (or backend=openai on a server of that GGUF)")

    def benchmark(self, inputs: BenchInputs, cfg: BenchConfig) -> tuple[dict[str, float], dict[str, str]]:
        if inputs.quantized and not cfg.measure_fake_quant:
            return {}, {"speed_valid": "false", "speed_measured": "no: fake quantization (modelopt simulated) runs "
                        "at the simulation's speed, not the format's; bench.measure_fake_quant=true times it anyway"}
        device = inputs.device
        # What this engine really reads: the weights as PyTorch holds them (fake quantization keeps them whole),
        # by the same rule as every engine's count (gb10exp/quant/bytes.py).
        target = Target(str(device), held := qbytes.from_module(inputs.model, dense_bits=None))
        if device.type == "cuda":
            target.reset_peak = lambda: torch.cuda.reset_peak_memory_stats(device)
            target.peak_bytes = lambda: float(torch.cuda.max_memory_allocated(device))
        metrics = {"engine_weight_gib": held.weight_bytes / 2**30}
        tags = {"speed_valid": str(not inputs.quantized).lower(), "bench.method": self.modes[0]}
        if inputs.quantized:
            tags["speed_note"] = "fake quantization: timed on request, not the format's speed"
        for i, mode in enumerate(self.modes):
            m, t = self._measure_mode(mode, inputs, cfg, target)
            prefix = "" if i == 0 else f"{mode}."
            metrics |= {prefix + k: v for k, v in m.items()}
            tags |= {prefix + k: v for k, v in t.items()}
        return metrics, tags

    def _measure_mode(self, mode: str, inputs: BenchInputs, cfg: BenchConfig, target: Target):
        model, device = inputs.model, inputs.device
        batch = lambda prompt: torch.tensor(prompt, device=device).repeat(cfg.batch_size, 1)  # noqa: E731
        length = cfg.depth + cfg.input_len  # bench.depth: context prefilled inside the timed request here
        warm_prompt = batch(inputs.prompt_tokens[:length].tolist())
        if mode == "fast":
            o = self.options
            compile_step = o.compile if o.compile != "auto" else device.type == "cuda"
            # close(): the model's weights get their own storage back (the fast path fuses them in place).
            with FastDecoder(model, cfg.batch_size, length, cfg.output_len, compile_step, o.cuda_graph,
                             tuned=o.tuned, pdl=o.pdl, regional=o.regional) as decoder:
                compile_s = decoder.warm(warm_prompt)
                metrics, tags = measure(lambda p: decoder.generate(batch(p)), inputs.prompt_tokens, cfg, target)
                tags["bench.fast"] = decoder.describe()
                if stats := decoder.compile_stats:  # why compile_s is what it is: cold, or from the cache
                    tags["bench.compile_cache"] = (
                        f"{stats['cache_dir']}: {stats['fxgraph_cache_hit']} FX graph(s) from the cache, "
                        f"{stats['fxgraph_cache_miss']} compiled, {stats['coordesc_tuning_bench']} kernel "
                        "configurations timed by coordinate descent")
            return metrics | {"compile_s": compile_s}, tags

        extra = {"cache_implementation": "static"} if mode == "static" else {}

        @torch.no_grad()
        def generate_once(prompt: list[int]) -> Timing:
            ids = batch(prompt)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timing = Timing(start=now(), batch_size=cfg.batch_size)
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.output_len,
                min_new_tokens=cfg.output_len, do_sample=False, streamer=TokenStamper(timing, device),
                pad_token_id=inputs.tokenizer.pad_token_id, **extra,
            )
            return timing

        start = time.perf_counter()
        generate_once(warm_prompt[0].tolist())  # the static cache's compilation happens in this first call
        first_call_s = time.perf_counter() - start
        metrics, tags = measure(generate_once, inputs.prompt_tokens, cfg, target)
        return metrics | {"compile_s": first_call_s}, tags
