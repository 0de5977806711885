"""The quantized-model and evaluation cache: keys, round trip (NVFP4 on the CPU included), identical
metrics with and without it, and safety against crashes and concurrent writers."""

from __future__ import annotations

import threading

import pytest
import torch
from inprocess import TINY, accuracy, all_runs, compose, fresh_cache, new_store, run_job

from gb10exp.quant import cache
from gb10exp.utils import publish_dir


@pytest.fixture
def store(tmp_path, monkeypatch):
    fresh_cache(tmp_path / "cache", monkeypatch)
    return new_store(tmp_path / "store")


@pytest.mark.parametrize("qformat", ["nvfp4", "fp8"])  # int4_awq: same path, 30 s on 2 cores
def test_cache_round_trip_gives_identical_metrics(qformat, store, tmp_path):
    miss = run_job([f"qformat={qformat}"], store)
    hit = run_job([f"qformat={qformat}", "force=true", "eval.batch_size=2"], store)  # new eval, cached model
    off = run_job([f"qformat={qformat}", "force=true", "cache=false"], store)
    tags = {r.info.run_id: r.data.tags for r in all_runs(store)}
    assert tags[miss["run_id"]]["quant_cache"] == "miss" and tags[hit["run_id"]]["quant_cache"] == "hit"
    assert tags[off["run_id"]]["quant_cache"] == "off" and tags[off["run_id"]]["eval_cache"] == "off"
    assert tags[hit["run_id"]]["eval_cache"] == "miss"  # evaluated afresh on the restored model
    assert accuracy(miss["metrics"]) == accuracy(hit["metrics"]) == accuracy(off["metrics"])
    assert len(list((tmp_path / "cache" / "quantized").iterdir())) == 1


def test_eval_cache_hit_skips_the_baseline(store, monkeypatch):
    first = run_job(["qformat=nvfp4"], store)

    def no_eval(*args, **kwargs):
        raise AssertionError("evaluated although the result is cached")

    monkeypatch.setattr("gb10exp.runner.evaluate_accuracy", no_eval)
    second = run_job(["qformat=nvfp4", "force=true"], store)
    assert accuracy(first["metrics"]) == accuracy(second["metrics"])
    assert first["windows"] == second["windows"]
    assert all_runs(store)[-1].data.tags["eval_cache"] == "hit"


def test_key_covers_what_determines_the_model():
    calib = torch.arange(256).view(4, 64)
    cpu, f32 = torch.device("cpu"), torch.float32

    def key(overrides, samples=calib):
        return cache.quant_key(compose([*TINY, *overrides])[0], samples, cpu, f32)

    base = key(["qformat=nvfp4"])
    assert base == key(["qformat=nvfp4", "eval.num_windows=2", "bench.output_len=7", "tracking.experiment=x"])
    different = [key(["qformat=fp8"]), key(["qformat=nvfp4", "kv_cache_qformat=fp8"]),
                 key(["qformat=nvfp4", "model.seed=1"]), key(["qformat=nvfp4", "calib.batch_size=2"]),
                 key(["qformat=nvfp4"], calib + 1)]  # other calibration tokens: dataset, size, seed, file
    assert base not in different and len(set(different)) == len(different)
    # An unquantized model does not depend on calibration at all.
    assert key(["qformat=bf16"]) == key(["qformat=bf16", "calib_size=8"], calib[:2])


def test_crash_while_filling_leaves_no_entry(tmp_path):
    entry = tmp_path / "quantized" / "abc"
    with pytest.raises(RuntimeError), publish_dir(entry) as tmp:
        (tmp / cache.STATE_FILE).write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not entry.exists() and list((tmp_path / "quantized").iterdir()) == []
    # A SIGKILLed writer leaves its temporary folder, which is never mistaken for the entry.
    (tmp_path / "quantized" / ".tmp-abc-x").mkdir()
    (tmp_path / "quantized" / ".tmp-abc-x" / cache.STATE_FILE).write_bytes(b"half")
    assert not (entry / cache.STATE_FILE).is_file()


def test_concurrent_writers_both_succeed(tmp_path):
    entry, errors = tmp_path / "eval" / "k", []
    barrier = threading.Barrier(2)

    def fill(text: str) -> None:
        try:
            with publish_dir(entry) as tmp:
                (tmp / "a.json").write_text(text)
                barrier.wait()  # both have written; both now try to publish
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=fill, args=(t,)) for t in ("one", "two")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert (entry / "a.json").read_text() in {"one", "two"}
    assert [p.name for p in entry.parent.iterdir()] == ["k"]  # the loser's copy is gone
