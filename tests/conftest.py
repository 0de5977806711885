"""Shared test helpers: an isolated cache, a throw-away MLflow store, and `python -m gb10exp` in a
subprocess exactly as a user types it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_skipped: list[tuple[str, str]] = []  # (test, reason) of this session's skips, said again at the end


def pytest_report_header(config) -> list[str]:
    """Which CPU this session ran on, and what llama.cpp may use on it: a green run says where it was green."""
    from gb10exp.backends.llamacpp import loader

    flags = loader.amx_flags()
    return [f"cpu: {loader.cpu_model()}; AMX: {' '.join(flags) or 'none'} -> llama.cpp extra buffer types "
            f"{'on' if loader.use_extra_bufts() else 'off'}"]


# `make test` runs two pytest-xdist workers (--dist loadfile): a test file runs in one worker, so its module
# fixtures (a server, a GGUF, a cluster) are built once; a sweep that several files read is run once for all
# workers (shared_sweep). The longest files start first, so that no worker is left with a long one at the end
# (their durations: benchmarks/results/test_durations_intel.log); the others follow in file order.
_LONGEST_FIRST = ("test_backend_llamacpp", "test_ray", "test_load", "test_report_e2e", "test_layerwise",
                  "test_nvfp4_deployed", "test_resume", "test_e2e", "test_launchers", "test_backend_openai",
                  "test_openai_contract", "test_determinism")


def pytest_configure(config) -> None:
    """Under pytest-xdist, PyTorch computes on one thread in each worker and in every process it starts, and
    OpenMP threads that wait sleep instead of spinning (llama.cpp's CPU backend, built with OpenMP, keeps a
    thread per core). By default both start a thread per core and wait actively: under two workers, the
    llama.cpp sweep's four children took 75 CPU-s for what takes 25 alone (benchmarks/results/
    test_durations_intel.log, run 8). Not pinned to a core:
    a process may use whichever core the others leave idle while they wait on a server or a child."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) < 2:
        return
    os.environ["OMP_NUM_THREADS"] = "1"  # the jobs, servers and scripts the tests start
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules:  # this worker's, sized when it was imported
        sys.modules["torch"].set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test fails, unless it is GPU-only: a skip there means something CI should have
    provided (a server, llama.cpp) is missing, and a green run must not hide it."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if os.environ.get("CI") and item.get_closest_marker("gpu") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (only GPU tests may skip): {reason}"


def pytest_runtest_logreport(report) -> None:
    """Every skip, seen where the summary is written (under pytest-xdist the workers' reports come here)."""
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        _skipped.append((report.nodeid, str(longrepr[-1]) if isinstance(longrepr, tuple) else str(longrepr)))


def pytest_terminal_summary(terminalreporter) -> None:
    if _skipped:
        terminalreporter.section(f"{len(_skipped)} test(s) did not run")
        for nodeid, reason in _skipped:
            terminalreporter.write_line(f"{nodeid}: {reason}")
        terminalreporter.write_line("make test starts the services these need (.ci/services.sh); "
                                    "under CI=true every skip but a GPU test's is a failure")

# Small sizes for the tiny random model: a job takes seconds.
TINY = ["model=tiny_llama", "calib_size=4", "calib.seq_len=64", "eval.seq_len=64", "eval.num_windows=4",
        "bench.enabled=false"]


def session_dir(tmp_path_factory) -> Path:
    """This session's folder, which all its pytest-xdist workers share (each has a base folder under it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Every test session gets its own gb10exp cache, so no test depends on an earlier session. Its workers
    share it: the embedded model is dequantized and its tokenizer converted once (the cache publishes each
    entry atomically, for concurrent jobs)."""
    path = session_dir(tmp_path_factory) / "gb10exp-cache"
    path.mkdir(exist_ok=True)
    os.environ["GB10EXP_CACHE"] = str(path)
    return path


def store_args(store: Path) -> list[str]:
    """Overrides that send a run's MLflow records and Hydra outputs into ``store``."""
    return [f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.artifact_root={store}/artifacts",
            f"hydra.sweep.dir={store}/outputs"]


def run_gb10exp(*args: str, store: Path | None = None, env: dict[str, str] | None = None,
                timeout: float = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gb10exp", *args, *(store_args(store) if store else [])]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def cli_error(*args: str, store: Path | None = None) -> str:
    """The one line ``python -m gb10exp ARGS`` prints before exiting 2, computed by the CLI's own check in this
    process (seconds instead of a Python start per case); asserts that it is one line and that nothing was
    written into ``store``. tests/test_bad_input.py::test_the_cli_prints_one_line_and_exits_2 runs the CLI."""
    from gb10exp.__main__ import bad_input
    from gb10exp.preflight import normalize

    line = bad_input(normalize([*(store_args(store) if store else []), *args]))  # later overrides win
    assert line is not None and line.startswith("gb10exp: error: ") and "\n" not in line, line
    if store is not None:
        assert not (store / "mlflow.db").exists() and not (store / "outputs").exists()
    return line


# The embedded model (SmolLM2-135M) at sizes that keep its end-to-end runs to about a minute each on 2 cores:
# 4 windows of 128 tokens, short benchmark generations. Tests that check the same sweep share one run of it.
EMBEDDED_SMALL = ["calib_size=4", "calib.seq_len=128", "eval.seq_len=128", "eval.num_windows=4",
                  "bench.input_len=64", "bench.output_len=12", "bench.warmup=1", "bench.repeats=3",
                  "bench.engine_ppl_windows=2"]
# The embedded model through llama.cpp in every format the llama.cpp tests check (test_backend_llamacpp.py,
# test_nvfp4_deployed.py): 16-bit, Q4_K_M, modelopt's NVFP4 deployed, llama.cpp's own NVFP4.
LLAMACPP_SWEEP = ("backend=llamacpp", "qformat=bf16,gguf_q4_k_m,nvfp4,gguf_nvfp4", *EMBEDDED_SMALL)
# The embedded model through PyTorch, the 16-bit job timed in two modes (test_e2e.py, test_determinism.py,
# test_backend_llamacpp.py): one sweep for every test that reads such runs.
E2E_SWEEP = ("qformat=bf16,fp8,nvfp4", "backend.options.compare=[generate]", *EMBEDDED_SMALL)


def shared_sweep(tmp_path_factory, *args: str) -> tuple[Path, subprocess.CompletedProcess]:
    """``python -m gb10exp ARGS`` into its own store, run once per session whichever test asks first, in
    whichever worker: the embedded model's sweeps are the suite's most expensive step, and several test files
    read the same runs. A worker that asks while another runs it waits for that run."""
    import fcntl
    import json

    from gb10exp.tracking import sha16

    store = session_dir(tmp_path_factory) / f"sweep-{sha16(args)}"
    record = store.with_suffix(".json")  # its exit status and output, for the tests that read them
    with open(f"{store}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            store.mkdir()
            out = run_gb10exp(*args, store=store)
            record.write_text(json.dumps({"returncode": out.returncode, "stdout": out.stdout, "stderr": out.stderr}))
    out = subprocess.CompletedProcess(args, **json.loads(record.read_text()))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return store, out


def runs_by_format(store: Path) -> dict:
    """The store's runs by qformat name (one each)."""
    _, runs = mlflow_runs(store)
    by_format = {r.data.params["qformat.name"]: r for r in runs}
    assert len(by_format) == len(runs), [r.info.run_name for r in runs]
    return by_format


def mlflow_runs(store: Path):
    """Every run in the store (all experiments), oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(ids, order_by=["attributes.start_time ASC"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], probe_url: str, name: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """A real server on loopback for the duration of the block: started, awaited until ``probe_url``
    answers (60 s at most; a server that exits at start fails at once), stopped afterwards."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(probe_url, timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited at start (exit code {proc.returncode})") from None
                time.sleep(0.5)
        else:
            raise RuntimeError(f"{name} did not answer {probe_url} within 60 s")
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)
