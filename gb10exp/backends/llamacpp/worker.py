"""llama.cpp in a child process, so that a native crash fails one run instead of the whole sweep.

``Engine`` starts ``python worker.py`` (run by path: the child imports neither torch nor gb10exp) and talks
to it in JSON lines over a private copy of the child's stdout; fd 1 and 2 go to a log file, so whatever
llama.cpp prints cannot corrupt a reply. A dead child (segfault, abort) closes the pipe and ``Engine``
raises ``EngineCrashed``: "llama.cpp crashed (signal 11)", with the end of the log. Times are stamped in
the child with ``time.perf_counter()`` (CLOCK_MONOTONIC, one clock for every process), so pipe latency
never enters a measurement. CPU buffer types are decided by ``loader.load_llama``, as everywhere else.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

if __package__:
    from gb10exp.backends.llamacpp.loader import load_llama
else:  # run by path as the child: this folder is sys.path[0], and the gb10exp package (torch) stays unimported
    from loader import load_llama


# ------------------------------------------------------------------------------------------------ child
class _Child:
    llm = None

    def load(
        self,
        path: str,
        n_ctx: int,
        logits_all: bool,
        n_gpu_layers: int,
        n_threads: int | None,
        extra_bufts: bool,
    ) -> dict:
        import llama_cpp

        if self.llm is not None:
            self.llm.close()
        self.llm = load_llama(
            path,
            extra_bufts=extra_bufts,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=n_threads,
            logits_all=logits_all,
            n_gpu_layers=n_gpu_layers,
            verbose=True,
        )  # into the log
        model = self.llm._model.model
        return {
            "n_layer": llama_cpp.llama_model_n_layer(model),
            "model_bytes": llama_cpp.llama_model_size(model),
            "state_bytes": llama_cpp.llama_state_get_size(self.llm._ctx.ctx),
            "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        }

    def nll(self, window: list[int], score_from: int = 1) -> dict:
        """Summed -log p(token i | tokens before it) for i = score_from..T-1 (eval.protocol's scored
        targets), float64 log-sum-exp."""
        import numpy as np

        self.llm.reset()  # position 0, empty KV cache: each window scored on its own
        self.llm.eval(window)
        logits = self.llm.scores[score_from - 1 : len(window) - 1].astype(np.float64)
        peak = logits.max(axis=1, keepdims=True)
        log_z = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
        targets = np.asarray(window[score_from:])
        nll = float((log_z - logits[np.arange(len(targets)), targets]).sum())
        return {"nll": nll, "tokens": len(targets)}

    def logits(self, window: list[int], out: str) -> dict:
        """The logits at every position of ``window`` (T x vocabulary, float32), written to the file ``out``
        (numpy .npy: megabytes, too large for a JSON line); position p predicts token p + 1."""
        import numpy as np

        self.llm.reset()  # position 0, empty KV cache: each window scored on its own
        self.llm.eval(window)
        np.save(out, np.asarray(self.llm.scores[: len(window)], dtype=np.float32))
        return {"path": out}

    def generate(self, prompt: list[int], depth: int, output_len: int) -> dict:
        """Greedy ``output_len`` tokens after ``prompt``; its first ``depth`` tokens are evaluated before
        the clock starts (llama-bench's depth), so the time covers only the rest of the prompt."""
        self.llm.reset()  # no prefix reuse between requests
        if depth:
            self.llm.eval(prompt[:depth])
        start = time.perf_counter()
        times = []
        tokens = self.llm.generate(
            prompt[depth:], temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=not depth
        )
        for _ in tokens:  # llama.cpp's raw generator never stops at EOS: exactly output_len tokens
            times.append(time.perf_counter())
            if len(times) == output_len:
                break
        tokens.close()
        return {"start": start, "token_times": times}

    def pid(self) -> dict:
        return {"pid": os.getpid()}


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # llama.cpp's prints go to the log (stderr), never into the protocol
    child = _Child()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "close":
            break
        try:
            reply = {"ok": getattr(child, op)(**request)}
        except Exception as exc:  # a Python error: reported, the child lives on
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(reply) + "\n")
    if child.llm is not None:
        child.llm.close()


# ----------------------------------------------------------------------------------------------- parent
class EngineCrashed(RuntimeError):
    """The llama.cpp child process died (a native crash): this run fails, the sweep goes on."""


class Engine:
    """The parent's handle on one child process; ``call(op, **args)`` returns the child's reply."""

    LOG_LINES = 30  # lines of the child's log quoted in a crash report

    def __init__(self) -> None:
        self.log_path = Path(tempfile.mkdtemp(prefix="gb10exp-llamacpp-")) / "llama.cpp.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, op: str, **args):
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise self._crashed(op)
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"llama.cpp worker, {op}: {reply['error']}")
        return reply["ok"]

    def _crashed(self, op: str) -> EngineCrashed:
        code = self.proc.wait(timeout=30)
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else "?"
            what = f"llama.cpp crashed (signal {-code}) [{name}] during {op}"
        else:
            what = f"llama.cpp's worker process exited with code {code} during {op}"
        self._log.flush()
        tail = deque(self.log_path.read_text(errors="replace").splitlines(), maxlen=self.LOG_LINES)
        log = "\n".join(tail) if tail else "(empty)"
        return EngineCrashed(f"{what}; its log: {self.log_path}, last lines:\n{log}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "close"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):  # a dead child's pipe: what was left unsent goes nowhere
                stream.close()
        self._log.close()


if __name__ == "__main__":
    main()
