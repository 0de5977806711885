"""On-disk cache of evaluation results: ``eval/<key>/accuracy.json`` holds perplexity, KL and top-1
agreement per window. Key: the quantized model's key (``gb10exp.quant.cache.quant_key``), the scored tokens,
eval batch size, compare_baseline, and the evaluator's source. KL needs the baseline's full logits (windows
x seq_len x vocab floats, gigabytes for a 128k vocabulary), so they are not cached: a miss evaluates the
baseline in memory; a hit needs no baseline. Entries are published complete (``utils.publish_dir``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gb10exp.config import Config
from gb10exp.data import EvalWindows
from gb10exp.evaluate import AccuracyResult, WindowStats
from gb10exp.quant.cache import digest, source_digest
from gb10exp.utils import cache_dir, publish_dir

EVAL_FILE = "accuracy.json"


def entry(cfg: Config, model_key: str, windows: EvalWindows) -> Path | None:
    """The eval-cache folder of this job (None with cache=false); ``model_key``: the job's ``quant_key``."""
    if not cfg.cache:
        return None
    return cache_dir("eval") / digest({
        "model": model_key, "windows": windows.digest(),  # windows: tokens, scored positions and protocol
        "batch_size": cfg.eval.batch_size, "compare_baseline": cfg.eval.compare_baseline,
        "code": source_digest("evaluate")})


def load(folder: Path | None) -> AccuracyResult | None:
    if folder is None or not (folder / EVAL_FILE).is_file():
        return None
    data = json.loads((folder / EVAL_FILE).read_text())
    return AccuracyResult(**{**data, "windows": WindowStats(**data["windows"])})


def state(folder: Path | None, cached: AccuracyResult | None) -> str:
    return "off" if folder is None else "hit" if cached is not None else "miss"


def save(folder: Path | None, result: AccuracyResult) -> None:
    """Publish a result once; a NaN or infinite one is never cached (the run fails on it anyway)."""
    values = [result.perplexity, result.nll_mean, result.kl_mean, result.top1_agreement, result.reference_perplexity]
    if folder is None or (folder / EVAL_FILE).is_file() or not all(v is None or math.isfinite(v) for v in values):
        return
    with publish_dir(folder) as tmp:
        (tmp / EVAL_FILE).write_text(json.dumps(result.as_dict()))
