"""What a person sees when opening the link ``make ui`` prints, in a browser that has never opened MLflow.

Runs logged by gb10exp's own Recorder into a real SQLite store (plus a report's run), the UI started by
``make ui``'s launcher on a free loopback port, the link rendered by headless Chromium with a fresh profile
at 1600x1000, and the rendered page read: positions, what sits on top, the cell texts. A check that only
finds the column names in the DOM passes with the columns hidden under MLflow's Assistant panel; this one
does not. ``UI_SCREENSHOT=docs/mlflow_ui_runs_table.png`` keeps its screenshot there (the docs' picture).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from chromium import Browser, executable
from conftest import ROOT, free_port
from inprocess import new_store

from gb10exp import hardware
from gb10exp.config import TrackingConfig
from gb10exp.tracking import Recorder
from gb10exp.tracking.mlflow_app import APP_NAME
from gb10exp.tracking.ui import COLUMNS, REPORT_TAG, ROUNDED, backfill_rounded, latest_experiment

# Five runs of the README's table (docs/readme_table/report.json: exact values as logged, embedded SmolLM2-135M
# on the CPU): perplexity, kl_mean, top1_agreement, weight_gib. CPU runs measure no decode speed; the table
# gets the report's projection for a GB10 instead (its bandwidth bound, 273 GB/s over the weight bytes), so
# that column has values to read.
ACCURACY = {
    "smollm2_135m-bf16-calib32-hf": (14.884582315993006, 0.0, 1.0, 0.2505537271499634),
    "smollm2_135m-fp8-calib32-hf": (15.218362394096562, 0.030689140943091685, 0.9019028871391076,
                                    0.15167677402496338),
    "smollm2_135m-nvfp4-calib32-hf": (22.885104388457858, 0.3938313656904566, 0.6847112860892388,
                                      0.10841810703277588),
    "smollm2_135m-nvfp4_awq-calib32-hf": (18.703194292368302, 0.21732158673404084, 0.7549212598425197,
                                          0.10841810703277588),
    "smollm2_135m-int4_awq-calib32-hf": (19.75667802751106, 0.2724153457351244, 0.7349081364829396,
                                         0.1037832498550415),
}
RUNS = {name: (*m, hardware.GB10.peak_gbps * 1e9 / (m[3] * 2**30)) for name, m in ACCURACY.items()}
# What the table must show for them: four significant digits, as JavaScript prints the logged copy.
SHOWN = {
    "smollm2_135m-bf16-calib32-hf": ["14.88", "0", "1", "0.2506", "1015"],
    "smollm2_135m-fp8-calib32-hf": ["15.22", "0.03069", "0.9019", "0.1517", "1676"],
    "smollm2_135m-nvfp4-calib32-hf": ["22.89", "0.3938", "0.6847", "0.1084", "2345"],
    "smollm2_135m-nvfp4_awq-calib32-hf": ["18.7", "0.2173", "0.7549", "0.1084", "2345"],
    "smollm2_135m-int4_awq-calib32-hf": ["19.76", "0.2724", "0.7349", "0.1038", "2450"],
}
REPORT_RUN = "report-readme-table-smollm2_135m"
# Sidebar pages that only MLflow's GenAI layout has ("Traces" is in both layouts, so it proves nothing).
GENAI_ONLY = ("/overview", "/chat-sessions", "/judges", "/review-queue", "/datasets", "/evaluation-runs",
              "/playground", "/prompts", "#/gateway")

# Everything the checks read, in one evaluation: links on screen, the Assistant panel's controls on screen,
# and for each column header its box, the grid's visible part, what is on top at its centre, whether its
# label is cut, and the column's cell texts by run name.
PAGE = r"""
((columns, genaiOnly) => {
  const W = innerWidth, H = innerHeight;
  const onScreen = (el) => { const r = el.getBoundingClientRect(), s = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && r.right > 0 && r.left < W && r.bottom > 0 && r.top < H &&
           s.visibility !== 'hidden' && s.display !== 'none'; };
  // a text is cut when it runs past a clipping box (overflow not visible) between it and `outer`
  const cut = (textNode, outer) => {
    const range = document.createRange();
    range.selectNodeContents(textNode);
    const t = range.getBoundingClientRect();
    for (let a = textNode.parentElement; a && a !== outer.parentElement; a = a.parentElement) {
      const box = a.getBoundingClientRect();
      if (getComputedStyle(a).overflowX !== 'visible' && (t.right > box.right + 1 || t.left < box.left - 1)) return true;
    }
    return false; };
  const textNode = (el, text) => { const w = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    while (w.nextNode()) if (w.currentNode.textContent.includes(text)) return w.currentNode;
    return null; };
  const runLinks = [...document.querySelectorAll('.ag-row a[href*="/runs/"]')].filter(a => a.textContent.trim());
  const rowOf = (el) => el.closest('.ag-row').getAttribute('row-index');  // ag-grid splits a row between containers
  const names = Object.fromEntries(runLinks.map(a => [rowOf(a), a.textContent.trim()]));
  const cols = {};
  for (const id of columns) {
    const h = document.querySelector(`.ag-header-cell[col-id="${id}"]`);
    if (!h) { cols[id] = null; continue; }
    const r = h.getBoundingClientRect(), vp = (h.closest('.ag-header-viewport') || h).getBoundingClientRect();
    const label = textNode(h, id.split('`')[1]);
    const top = document.elementFromPoint((r.left + r.right) / 2, (r.top + r.bottom) / 2);
    const cells = {};
    for (const c of document.querySelectorAll(`.ag-center-cols-container .ag-cell[col-id="${id}"]`)) cells[names[rowOf(c)]] = c.textContent.trim();
    cols[id] = {inside: r.left >= Math.max(vp.left, 0) - 1 && r.right <= Math.min(vp.right, W) + 1 && r.top >= 0 && r.bottom <= H,
                onTop: !!top && h.contains(top), label: label && label.textContent.trim(), cut: !label || cut(label, h),
                left: Math.round(r.left), right: Math.round(r.right), cells};
  }
  return {genai: [...document.querySelectorAll('a[href]')].filter(onScreen).map(a => a.getAttribute('href'))
                   .filter(h => genaiOnly.some(g => h.split('?')[0].includes(g))),
          assistant: [...document.querySelectorAll('[data-component-id^="mlflow.assistant.chat_panel"]')].filter(onScreen).length,
          columns: cols, runs: Object.values(names),
          runsCut: runLinks.filter(a => cut(textNode(a, a.textContent.trim()), a.closest('.ag-cell'))).map(a => a.textContent.trim())};
})
"""


def log_runs(store: Path) -> None:
    """The runs as gb10exp records them, and a report's run in the same experiment (as log_report makes it)."""
    recorder = Recorder(TrackingConfig(uri=f"sqlite:///{store}/mlflow.db", experiment="readme-table-smollm2_135m",
                                       artifact_root=str(store / "artifacts")))
    for name, values in RUNS.items():
        qformat = name.split("-")[1]
        how = "none" if qformat == "bf16" else "simulated (modelopt fake quantization)"
        with recorder.run(name, {"qformat": {"name": qformat}}, [f"qformat={qformat}"],
                          {"hardware": "cpu AMD EPYC x2", "quantization": how}):
            recorder.log_metrics(dict(zip(COLUMNS, values, strict=True)))
    report = recorder.client.create_run(recorder.experiment_id, run_name=REPORT_RUN, tags={REPORT_TAG: "report"})
    recorder.client.set_terminated(report.info.run_id, "FINISHED")


def page_state(browser: Browser, columns: list[str]) -> dict:
    return browser.eval(f"({PAGE})({json.dumps(columns)}, {json.dumps(GENAI_ONLY)})")


@pytest.fixture
def ui(tmp_path):
    """``make ui``'s launcher on a free port over a store with the runs above: yields the link it prints."""
    assert any(e.name == APP_NAME for e in entry_points(group="mlflow.app")), (
        f"MLflow app {APP_NAME!r} is not registered in this environment: pip install -e . (make env does it)")
    t0 = time.monotonic()
    store = new_store(tmp_path / "store")
    log_runs(store)
    t1 = time.monotonic()
    port, log = free_port(), tmp_path / "mlflow-ui.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gb10exp.tracking.ui", "--store", f"sqlite:///{store}/mlflow.db",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
        start_new_session=True)  # stopped as a group: the launcher's mlflow ui and its uvicorn worker
    try:
        printed = [proc.stdout.readline(), proc.stdout.readline()]  # what it is, then the link
        assert printed[0].startswith("runs table of the latest experiment"), printed
        link = printed[1].strip()
        assert link.startswith(f"http://127.0.0.1:{port}/#/experiments/"), printed
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None, f"mlflow ui exited with {proc.returncode}: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "mlflow ui did not answer /health within 120 s"
                time.sleep(0.3)
        print(f"runs logged in {t1 - t0:.1f} s; mlflow ui answered {time.monotonic() - t1:.1f} s after its start")
        yield link
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.chromium
@pytest.mark.skipif(executable() is None, reason="needs chromium on PATH (Debian: apt-get install -y chromium)")
def test_the_printed_link_opens_on_the_comparison_in_a_new_browser(ui, tmp_path):
    headers = [f"metrics.`{ROUNDED}{m}`" for m in COLUMNS]
    shot = Path(os.environ.get("UI_SCREENSHOT") or tmp_path / "runs_table.png")
    t0 = time.monotonic()
    with Browser(1600, 1000) as browser:
        browser.goto(ui)
        assert browser.wait_for(
            f"document.querySelectorAll('.ag-center-cols-container .ag-row').length >= {len(RUNS)} && "
            f"document.querySelector('.ag-header-cell[col-id=\"{headers[-1]}\"]') !== null", timeout=90), (
            f"the runs table of {ui} did not render within 90 s")
        time.sleep(1.5)  # column widths and the Assistant's auto-open land after the first rows
        seen = page_state(browser, headers)
        t1 = time.monotonic()
        browser.screenshot(shot)
        # A run's page, reached by clicking a run: the GenAI layout titles it "Evaluations" (the link's
        # workflowType does not follow the click; only the stored layout does).
        browser.eval("document.querySelector('.ag-row a[href*=\"/runs/\"]').click()")
        assert browser.wait_for("/runs\\/[0-9a-f]{32}/.test(location.hash) && "  # its sidebar is there:
                                "document.querySelector('a[href*=\"/traces\"]') !== null", timeout=30)
        time.sleep(1.0)
        run_page = page_state(browser, [])

    print(f"table rendered in {t1 - t0:.1f} s, run page {time.monotonic() - t1:.1f} s; screenshot: {shot}")
    assert seen["genai"] == [], f"GenAI navigation on the runs page: {seen['genai']}"
    assert seen["assistant"] == 0, "the MLflow Assistant panel is open over the table"
    for header, name in zip(headers, COLUMNS, strict=True):
        column = seen["columns"][header]
        assert column is not None, f"no {name} column in the table"
        assert column["inside"], f"{name} column header off-screen (x {column['left']}..{column['right']})"
        assert column["onTop"], f"{name} column header covered by something else"
        assert column["label"] == header.split("`")[1] and not column["cut"], f"{name} header cut: {column}"
    assert sorted(seen["runs"]) == sorted(RUNS), f"runs in the table: {seen['runs']}"  # the report's is not
    assert seen["runsCut"] == [], f"run names cut: {seen['runsCut']}"
    for i, header in enumerate(headers):
        shown = {run: cells[i] for run, cells in SHOWN.items()}
        assert seen["columns"][header]["cells"] == shown, f"{COLUMNS[i]} reads {seen['columns'][header]['cells']}"
    assert run_page["genai"] == [], f"GenAI navigation on a run's page: {run_page['genai']}"


def test_runs_from_before_the_rounded_copies_get_them_and_reports_never_count_as_the_latest(tmp_path):
    from mlflow.tracking import MlflowClient

    store = new_store(tmp_path / "store")
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    old = client.create_experiment("old")
    before = client.create_run(old, run_name="logged-before-the-copies").info.run_id
    client.log_metric(before, "perplexity", 15.218362394096562)
    client.log_metric(before, "kl_mean", 0.030689140943091685)
    client.log_metric(before, "top1_agreement", 0.9019028871391076)
    newer = client.create_experiment("newer, with only a report")
    client.create_run(newer, run_name="report-x", tags={REPORT_TAG: "report"})

    assert latest_experiment(client) == old  # the report's run is newer, but not a job's
    assert backfill_rounded(client, old) == 1
    assert backfill_rounded(client, old) == 0  # once
    metrics = client.get_run(before).data.metrics
    assert {k: v for k, v in metrics.items() if k.startswith(ROUNDED)} == {
        "rounded/perplexity": 15.22, "rounded/kl_mean": 0.03069, "rounded/top1_agreement": 0.9019}
