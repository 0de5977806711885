"""Check in a real browser that the MLflow UI opens on gb10exp's runs table with the metrics as columns.

    python benchmarks/ui_check.py [--store DIR] [--screenshot docs/mlflow_ui_runs_table.png]

Runs a tiny 3-job sweep into a fresh store (unless --store names a folder holding one), starts the UI the way
``make ui`` does (``python -m gb10exp.tracking.ui``, loopback, a free port), loads the link it prints in
headless Chromium (Debian's ``chromium`` package), saves a screenshot and checks the rendered page: every run
name in full, the five metric columns and their values. Exit status 0 only when all are there.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model=tiny_llama",
    "calib_size=4",
    "calib.seq_len=64",
    "eval.seq_len=64",
    "eval.num_windows=4",
    "bench.input_len=32",
    "bench.output_len=8",
    "bench.warmup=1",
    "bench.repeats=2",
]
HEADERS = ("perplexity", "kl_mean", "top1_agreement", "weight_gib", "decode_tokens_per_s")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=2000,700",
    "--virtual-time-budget=30000",
    "--hide-scrollbars",
]


def sweep(store: Path) -> None:
    args = [
        *TINY,
        "qformat=bf16,fp8,int4",
        f"tracking.uri=sqlite:///{store}/mlflow.db",
        f"tracking.artifact_root={store}/artifacts",
        f"hydra.sweep.dir={store}/outputs",
        "tracking.experiment=ui-check",
    ]
    subprocess.run([sys.executable, "-m", "gb10exp", *args], cwd=ROOT, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium(url: str, *extra: str, profile: Path) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("ui_check: no chromium on PATH (Debian: apt-get install -y chromium)")
    out = subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    return out.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="folder with mlflow.db from an earlier run of this script")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "mlflow_ui_runs_table.png")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ui-check-"))
    store = args.store or work / "store"
    if not (store / "mlflow.db").exists():
        store.mkdir(parents=True, exist_ok=True)
        sweep(store)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    experiment = client.get_experiment_by_name("ui-check")
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(r.info.run_name for r in runs)

    port = free_port()
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gb10exp.tracking.ui",
            "--store",
            f"sqlite:///{store}/mlflow.db",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # stopped as a group: mlflow ui and its uvicorn workers
    )
    try:
        url = ""
        while not url:  # the launcher prints the link before it starts the server
            line = ui.stdout.readline()
            if not line:
                raise SystemExit("ui_check: the UI launcher exited without printing a link")
            url = line.strip() if line.strip().startswith("http") else ""
        deadline = time.time() + 600  # mlflow ui starts its workers slowly on a busy 2-core machine
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except OSError:
                if time.time() > deadline or ui.poll() is not None:
                    raise SystemExit(f"ui_check: the MLflow UI did not answer on port {port}") from None
                time.sleep(1)
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        chromium(url, f"--screenshot={args.screenshot}", profile=work / "profile-shot")
        dom = chromium(url, "--dump-dom", profile=work / "profile-dom")
    finally:  # the server and its workers: the whole process group
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()

    if not args.screenshot.is_file():
        raise SystemExit(f"ui_check: chromium wrote no screenshot to {args.screenshot}")
    (work / "dom.html").write_text(dom)
    text = re.sub(r"<[^>]+>", " ", dom)
    missing = [f"column {h}" for h in HEADERS if h not in text]
    missing += [f"run name {n}" for n in names if n not in text]
    ppl = {r.info.run_name: r.data.metrics["perplexity"] for r in runs}
    missing += [
        f"perplexity value of {n}" for n, v in ppl.items() if repr(v)[:6] not in text
    ]  # shown in full
    print(f"url: {url}\nscreenshot: {args.screenshot}\ndom: {work / 'dom.html'} ({len(dom)} characters)")
    print(f"runs: {names}")
    if missing:
        print("MISSING: " + "; ".join(missing))
        return 1
    print("ok: every run name in full, the five metric columns and the perplexity values are on the page")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
