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


def test_cache_keys_come_from_content_not_name_and_size(tmp_path):
    from gb10exp.backends.llamacpp import gguf
    from gb10exp.models import _gguf_key
    from gb10exp.utils import content_key

    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path, fill in ((a, b"x"), (b, b"y")):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + fill * 1000)  # same name, same size, different content
    assert content_key(a) != content_key(b)
    assert gguf._file_key(a) != gguf._file_key(b) and _gguf_key(a) != _gguf_key(b)
    assert content_key(a) == content_key(tmp_path / "a" / ".." / "a" / "model.gguf")


def test_large_files_are_keyed_by_samples(tmp_path, monkeypatch):
    from gb10exp import utils

    monkeypatch.setattr(utils, "FULL_HASH_MAX_BYTES", 2**20)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(20 * 2**20))
    before = utils.content_key(big)
    with big.open("r+b") as f:  # one changed byte inside the first sample, same size and mtime
        stat = big.stat()
        f.seek(100)
        f.write(b"\x01")
    import os

    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    utils._content_key.cache_clear()
    assert utils.content_key(big) != before


def test_local_model_identity_follows_content_not_path(tmp_path):
    import shutil

    from gb10exp.config import ModelConfig
    from gb10exp.quant.cache import model_identity

    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "config.json").write_text('{"a": 1}')
    shutil.copytree(tmp_path / "m1", tmp_path / "m2")
    ident = lambda folder: model_identity(ModelConfig(name="local", source="local", path=str(tmp_path / folder)))  # noqa: E731
    assert ident("m1") == ident("m2")  # a moved or copied model keeps its cache entries
    (tmp_path / "m2" / "config.json").write_text('{"a": 2}')
    assert ident("m1") != ident("m2")


def test_config_values_in_cache_paths_are_sanitized(tmp_path, monkeypatch):
    from gb10exp.backends.llamacpp import gguf
    from gb10exp.config import ModelConfig
    from gb10exp.utils import cache_dir, safe_name

    monkeypatch.setenv("GB10EXP_CACHE", str(tmp_path / "cache"))
    assert safe_name("../../etc/x y") == "_.._etc_x_y"
    key = gguf._model_key(ModelConfig(name="../../evil name", source="random", arch={"hidden_size": 8}))
    assert "/" not in key and not key.startswith(".")
    assert cache_dir("gguf", key).resolve().is_relative_to((tmp_path / "cache").resolve())


def test_stale_tmp_entries_are_removed_unless_their_writer_lives(tmp_path):
    import json
    import os
    import time

    from gb10exp.tracking.liveness import owner_tags
    from gb10exp.utils import OWNER_FILE, publish_dir, remove_stale_tmp

    old = time.time() - 2 * 86400
    dead_writer, live_writer, fresh = (tmp_path / "q" / f".tmp-{n}" for n in ("dead", "live", "fresh"))
    for folder in (dead_writer, live_writer, fresh):
        folder.mkdir(parents=True)
    (dead_writer / OWNER_FILE).write_text(json.dumps(owner_tags() | {"owner_pid": "999999999"}))
    (live_writer / OWNER_FILE).write_text(json.dumps(owner_tags()))  # this process: still writing
    for folder in (dead_writer, live_writer):
        os.utime(folder, (old, old))
    assert remove_stale_tmp(tmp_path) == [dead_writer]
    assert live_writer.exists() and fresh.exists()
    with publish_dir(tmp_path / "entry") as tmp:
        (tmp / "data").write_text("x")
    assert sorted(p.name for p in (tmp_path / "entry").iterdir()) == ["data"]  # no owner file published


def _fake_sdist(folder, version: str = "9.9.9"):
    import hashlib
    import io
    import tarfile

    sdist = folder / f"llama_cpp_python-{version}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in [("vendor/llama.cpp/convert_hf_to_gguf.py", "print('converter')\n"),
                           ("vendor/llama.cpp/gguf-py/gguf/__init__.py", ""), ("setup.py", "")]:
            info = tarfile.TarInfo(f"llama_cpp_python-{version}/{name}")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    return sdist, hashlib.sha256(sdist.read_bytes()).hexdigest()


def test_converter_is_installed_hash_checked_and_never_taken_from_the_cache(tmp_path, monkeypatch):
    import sys

    from gb10exp.backends.llamacpp import gguf
    from gb10exp.config import ConfigError

    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(gguf.metadata, "version", lambda name: "9.9.9")
    monkeypatch.setenv("GB10EXP_CACHE", str(tmp_path / "cache"))
    planted = tmp_path / "cache" / "llama.cpp-convert" / "9.9.9" / "convert_hf_to_gguf.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("raise SystemExit('code from the cache')\n")  # what the old code would have run
    with pytest.raises(ConfigError, match=r"convert_hf_to_gguf.py is not installed .*run `make converter`"):
        gguf.converter()
    sdist, sha = _fake_sdist(tmp_path)
    with pytest.raises(SystemExit, match="is not the pinned"):
        gguf.install_converter(sdist, "0" * 64)
    script = gguf.install_converter(sdist, sha)
    assert gguf.converter() == script and script.is_relative_to(tmp_path / "venv" / "share")
    assert script.read_text() == "print('converter')\n" and (script.parent / "gguf-py" / "gguf").is_dir()
    assert not (script.parent / "setup.py").exists()


def test_hub_snapshot_takes_only_what_loading_needs():
    import fnmatch

    from gb10exp.models import HUB_PATTERNS

    needed = ["config.json", "model-00001-of-00004.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "model.safetensors.index.json"]
    skipped = ["original/consolidated.00.pth", "pytorch_model.bin", "original/params.json.pth"]
    assert all(any(fnmatch.fnmatch(f, p) for p in HUB_PATTERNS) for f in needed)
    assert not any(fnmatch.fnmatch(f, p) for f in skipped for p in HUB_PATTERNS)
