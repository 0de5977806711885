"""``eval.enabled=false``: the speed of whatever an engine serves, with no model of ours and no accuracy.

For a server (``backend=openai``) or a given GGUF (``backend=llamacpp backend.options.gguf=F``) holding a
model other than the configured one: nothing is loaded, quantized or evaluated, the engine is only timed
(prompts still come from the evaluation text, through the configured tokenizer), and the run is named
after the served model. The engine's weight bytes come from the GGUF, the server, or ``bench.model_bytes``.
"""

from __future__ import annotations

import time
from typing import Any

from gb10exp.backends import BenchInputs
from gb10exp.config import Config, ConfigError
from gb10exp.tracking.environment import environment


def served_model(backend) -> str | None:
    """The model an engine serves on its own (a server's model, a given GGUF); None for in-process backends,
    which run the configured model and have no such attribute."""
    return getattr(backend, "served_model", None)


def check(cfg: Config, backend) -> None:
    if not cfg.eval.enabled and served_model(backend) is None:
        raise ConfigError(
            f"eval.enabled=false is not allowed with backend={cfg.backend.name}: speed-only runs time "
            "what an engine serves; use backend=openai, or backend=llamacpp with "
            "backend.options.gguf=FILE (or eval.enabled=true)"
        )


def run_name(cfg: Config, backend) -> str:
    return cfg.tracking.run_name or f"{served_model(backend)}-speed-{cfg.backend.name}"


def run_speed_only(
    cfg: Config, p, resolved: dict, overrides: list[str], sweep_tags: dict[str, str]
) -> dict[str, Any]:
    """One speed-only job (``p``: the runner's Prepared); returns its results like ``runner.run``."""
    from gb10exp.tracking.identity import run_identity

    # The same identity as any run (hardware, code, versions, prompts' text): a speed-only rerun on another
    # machine or code is a new run.
    ident = run_identity(cfg, resolved, p.device, p.dtype, p.tokenizer, p.calib, p.windows)
    name = run_name(cfg, p.backend)
    if not cfg.force and (done := p.recorder.find_finished(ident.key)):
        return {"skipped": True, "run_id": done.run_id}
    tags = (
        environment(p.device)
        | sweep_tags
        | ident.tags
        | {
            "model": str(served_model(p.backend)),
            "served_model": str(served_model(p.backend)),
            "backend": cfg.backend.name,
            "accuracy": "none: eval.enabled=false (speed only)",
        }
    )
    with p.recorder.run(name, resolved, overrides, tags) as rec:
        start = time.perf_counter()
        inputs = BenchInputs(
            None, p.tokenizer, p.eval_tokens, p.device, False, cfg.model, cfg.qformat, 0.0
        )
        metrics: dict[str, float] = {}
        try:
            rec.set_tags(p.backend.prepare(inputs))
            metrics["startup_s"] = time.perf_counter() - start
            t = time.perf_counter()
            bench, bench_tags = p.backend.benchmark(inputs, cfg.bench)
            metrics |= bench | {"benchmark_s": time.perf_counter() - t}
            rec.set_tags(bench_tags)
        finally:
            p.backend.close()
        metrics["total_s"] = time.perf_counter() - start
        rec.log_metrics(metrics)
        results = {"run_id": rec.run_id, "name": name, "metrics": metrics, "windows": None, "tags": tags}
        rec.log_dict(results, "results.json")
    return results
