"""A small client of headless Chromium's DevTools protocol over ``--remote-debugging-pipe``
(file descriptors 3 and 4, NUL-separated JSON; standard library only), for the tests of
the rendered book: open a page with the network switched off, wait for MathJax, evaluate
JavaScript, collect console errors and requests, take (clipped) screenshots.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["Browser", "PageReport"]

# waits until MathJax has typeset the page (if it uses MathJax) and the fonts are loaded,
# and every image has loaded or failed
_SETTLE_JS = """(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  await Promise.all([...document.images].map(i => i.complete ? null :
      new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
  await document.fonts.ready;
  return true;
})()"""


class PageReport(dict):
    """What :meth:`Browser.open` saw: ``errors`` (console errors, exceptions, failed loads),
    ``requests`` (URLs the page asked for), ``session`` (to evaluate more)."""

    @property
    def errors(self) -> list[str]:
        return self["errors"]

    @property
    def requests(self) -> list[str]:
        return self["requests"]


class Browser:
    """One headless Chromium; use as a context manager."""

    def __init__(self, exe: str, profile_dir: Path, timeout: float = 60.0):
        self.timeout = timeout
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # the child must see them as fds 3 (commands) and 4 (replies): copy them above 10
        # first, so that neither dup2 overwrites the other's source
        src_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
        src_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)

        def _fds():  # runs in the child before exec
            os.dup2(src_r, 3)
            os.dup2(src_w, 4)

        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-extensions", "--remote-debugging-pipe", f"--user-data-dir={profile_dir}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     pass_fds=(3, 4, src_r, src_w), preexec_fn=_fds)
        for fd in (to_child_r, from_child_w, src_r, src_w):
            os.close(fd)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # -- protocol --------------------------------------------------------------------------
    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._replies[-1] = {"error": {"message": "chromium closed the pipe"}}
                    self._cond.notify_all()
                return
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            for raw in msgs:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    self._events.put(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Call a DevTools method; returns its result (raises on a protocol error)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while self._next_id not in self._replies and -1 not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no reply to {method} in {self.timeout} s")
                self._cond.wait(left)
            reply = self._replies.pop(self._next_id, None) or self._replies[-1]
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def _drain(self, sink: list[dict]) -> None:
        while True:
            try:
                sink.append(self._events.get_nowait())
            except queue.Empty:
                return

    def evaluate(self, session: str, expression: str) -> Any:
        """The JSON value of a JavaScript expression (promises awaited)."""
        r = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                      session)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JavaScript error: {r['exceptionDetails'].get('exception', {}).get('description')}")
        return r["result"].get("value")

    # -- pages -----------------------------------------------------------------------------
    def open(self, url: str, size: tuple[int, int] = (1280, 1000)) -> PageReport:
        """Open ``url`` in a new tab with the network off, wait for the load event, MathJax,
        the fonts and the images; returns what went wrong on the way."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            self.send(method, session=session)
        self.send("Network.emulateNetworkConditions",
                  {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}, session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False}, session)
        events: list[dict] = []
        self._drain(events)
        events.clear()
        self.send("Page.navigate", {"url": url}, session)
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session for e in events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load in {self.timeout} s")
            try:
                events.append(self._events.get(timeout=0.2))
            except queue.Empty:
                pass
        self.evaluate(session, _SETTLE_JS)
        time.sleep(0.2)  # late console messages
        self._drain(events)
        errors, requests = [], []
        for e in events:
            if e.get("sessionId") != session:
                continue
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
            elif m == "Network.requestWillBeSent":
                requests.append(p.get("request", {}).get("url", ""))
            elif m == "Network.loadingFailed" and not p.get("canceled"):
                errors.append(f"failed load: {p.get('errorText')} ({p.get('type')})")
        return PageReport(errors=errors, requests=requests, session=session, target=target)

    def screenshot(self, session: str, clip: dict | None = None) -> bytes:
        """PNG of the viewport, or of ``clip`` (``x, y, width, height`` in page pixels)."""
        params: dict[str, Any] = {"format": "png"}
        if clip:
            params.update(clip={**clip, "scale": 1}, captureBeyondViewport=True)
        return base64.b64decode(self.send("Page.captureScreenshot", params, session)["data"])

    def close_page(self, report: PageReport) -> None:
        self.send("Target.closeTarget", {"targetId": report["target"]})

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
