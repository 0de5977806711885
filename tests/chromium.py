"""Headless Chromium driven over the DevTools protocol, with Debian's ``chromium`` and the standard library only.

``--remote-debugging-pipe`` makes Chromium read NUL-terminated JSON commands on file descriptor 3 and write
replies and events on 4 (Playwright's transport): no port, no websocket package. Each Browser has a fresh
profile (empty localStorage: what a new user's browser holds) and a fixed viewport.

    with Browser(1600, 1000) as b:
        b.goto(url)
        b.wait_for("document.querySelector('.ag-row') !== null")
        b.eval("document.title"); b.screenshot(path)
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--hide-scrollbars", "--remote-debugging-pipe",
         "--disable-dev-shm-usage"]  # containers often give /dev/shm 64 MB, too little for a renderer


def executable() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    def __init__(self, width: int, height: int, timeout: float = 60.0):
        exe = executable()
        if exe is None:
            raise RuntimeError("no chromium on PATH (Debian: apt-get install -y chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_child, self._write = os.pipe()  # we write, Chromium reads on fd 3
        self._read, from_child = os.pipe()  # Chromium writes on fd 4

        def fds_3_and_4() -> None:  # in the child, before exec
            a, b = os.dup(to_child), os.dup(from_child)  # dup first: the pipe ends may already be 3 or 4
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [exe, *FLAGS, f"--window-size={width},{height}", f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=fds_3_and_4, close_fds=False, start_new_session=True)
        os.close(to_child)
        os.close(from_child)
        self._id = 0
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._reader, daemon=True).start()
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _reader(self) -> None:
        buf = b""
        with os.fdopen(self._read, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                buf += chunk
                *messages, buf = buf.split(b"\0")
                with self._cond:
                    for raw in messages:
                        msg = json.loads(raw)
                        if "id" in msg:  # events (no id) are not needed: waits poll the page instead
                            self._replies[msg["id"]] = msg
                    self._cond.notify_all()

    def send(self, method: str, session: bool = False, **params: Any) -> dict:
        with self._cond:
            self._id += 1
            mid = self._id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._write, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._replies, timeout=self.timeout):
                raise RuntimeError(f"chromium: no reply to {method} in {self.timeout:.0f} s")
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"chromium: {method}: {reply['error']}")
        return reply.get("result", {})

    def goto(self, url: str) -> None:
        self.send("Page.navigate", session=True, url=url)

    def eval(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression evaluated in the page (promises awaited)."""
        r = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"chromium: {r['exceptionDetails'].get('exception', {}).get('description')}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> bool:
        """Poll until the expression is truthy; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.eval(expression):
                    return True
            except RuntimeError:  # the page is between documents
                pass
            time.sleep(0.25)
        return False

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", session=True, format="png")["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=10)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
