"""Open a page in headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it) and report what it logged.

Chromium's ``--enable-logging=stderr`` prints console messages but not failed loads (a missing image logs
"Failed to load resource" only to DevTools), so this speaks the DevTools protocol over
``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-separated JSON): it collects console errors and warnings,
uncaught exceptions and the browser's own log entries (failed loads, blocked content), waits for the load event
(every image loaded or failed) and captures a full-page screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

PROBLEM_LEVELS = ("error", "warning", "assert")


def chromium_path() -> str:
    """The ``chromium`` binary; fails with a message naming the fix when it is absent."""
    path = shutil.which("chromium")
    if path is None:
        raise AssertionError("headless Chromium is missing: `.ci/run` installs Debian's chromium "
                             "(as root: apt-get update && apt-get install -y chromium)")
    return path


class _Pipe:
    def __init__(self, write_fd: int, read_fd: int, deadline: float) -> None:
        self.write_fd, self.read_fd, self.deadline = write_fd, read_fd, deadline
        self.buffer = b""
        self.messages: list[dict[str, Any]] = []
        self.next_id = 0

    def _read_until(self, wanted: Any) -> dict[str, Any]:
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                message = json.loads(raw)
                self.messages.append(message)
                if wanted(message):
                    return message
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("headless Chromium did not answer in time")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError("headless Chromium closed its DevTools pipe (did it start?)")
                self.buffer += chunk

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        ident = self.next_id
        answer = self._read_until(lambda m: m.get("id") == ident)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def wait_for(self, method: str) -> dict[str, Any]:
        return self._read_until(lambda m: m.get("method") == method)

    def problems(self) -> list[str]:
        """Console errors/warnings, uncaught exceptions and error/warning log entries, one line each."""
        out = []
        for m in self.messages:
            method, p = m.get("method"), m.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in PROBLEM_LEVELS:
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif method == "Runtime.exceptionThrown":
                out.append("uncaught: " + str(p["exceptionDetails"].get("text")))
            elif method == "Log.entryAdded" and p["entry"].get("level") in PROBLEM_LEVELS:
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        return out


def open_page(url: str, screenshot: Path, profile: Path, *, width: int = 1400, height: int = 2000,
              timeout: float = 90.0) -> list[str]:
    """Load ``url``, save a full-page PNG screenshot to ``screenshot`` and return the problems it logged."""
    binary = chromium_path()
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()

    def fds_3_and_4() -> None:  # the DevTools pipe: Chromium reads fd 3 and writes fd 4
        a, b = os.dup(to_r), os.dup(from_w)
        os.dup2(a, 3)
        os.dup2(b, 4)

    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--hide-scrollbars",
         "--no-first-run", f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
        pass_fds=(3, 4), preexec_fn=fds_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_r)
    os.close(from_w)
    pipe = _Pipe(to_w, from_r, time.monotonic() + timeout)
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.call(f"{domain}.enable", session=session)
        pipe.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
        pipe.call("Page.navigate", {"url": url}, session)
        pipe.wait_for("Page.loadEventFired")
        size = pipe.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": width, "height": min(max(size["height"], 1), 12000), "scale": 1}
        shot = pipe.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip},
                         session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        problems = pipe.problems()
        pipe.call("Browser.close")
        return problems
    finally:
        os.close(to_w)
        os.close(from_r)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
