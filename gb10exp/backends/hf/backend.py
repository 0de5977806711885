"""In-process PyTorch/transformers: ``model.generate`` with a streamer that stamps each new token."""

from __future__ import annotations

import torch

from gb10exp.backends.base import BenchInputs
from gb10exp.bench import Timing, measure, now
from gb10exp.config import BenchConfig


class _Stamper:
    """A generate() streamer: records the arrival time of every generated token (not the prompt)."""

    def __init__(self, timing: Timing, device: torch.device):
        self.timing, self.device, self.prompt_seen = timing, device, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt itself
            self.prompt_seen = True
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timing.token_times.append(now())

    def end(self) -> None:
        pass


class HFBackend:
    name = "hf"

    def check(self) -> None:
        pass

    def benchmark(self, inputs: BenchInputs, cfg: BenchConfig) -> tuple[dict[str, float], dict[str, str]]:
        prompt = inputs.prompt_tokens[: cfg.input_len].to(inputs.device).repeat(cfg.batch_size, 1)

        @torch.no_grad()
        def generate_once() -> Timing:
            timing = Timing(start=now(), batch_size=cfg.batch_size)
            inputs.model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=cfg.output_len,
                min_new_tokens=cfg.output_len, do_sample=False, streamer=_Stamper(timing, inputs.device),
                pad_token_id=inputs.tokenizer.pad_token_id,
            )
            return timing

        metrics = measure(generate_once, cfg.warmup, cfg.repeats, cfg.input_len, cfg.output_len)
        tags = {"speed_valid": str(not inputs.quantized).lower(), "bench.method": "generate-eager"}
        return metrics, tags
