"""Open a self-contained HTML file in a real headless Chromium and report what happened.

Drives Debian's Chromium (``apt-get install chromium``) through the Chrome DevTools
Protocol over ``--remote-debugging-pipe``: no driver binary, no Python package beyond the
standard library, no TCP port.

    report = open_page("report.html", screenshot=tmp_path / "report.png")
    assert report.problems() == []          # console errors, page errors, dialogs,
    assert "PASS" in report.text            # broken images, requests that left the page

Nothing leaves the machine: every request whose scheme is not data:, file:, blob: or
about: is recorded in ``external_requests`` and failed by the harness before it is sent
(Fetch interception); as further layers, host names resolve to nothing and the browser's
proxy is a closed port on loopback, so WebSockets and anything the interception does not
see cannot connect either.

Tests call ``require_browser()`` first: it installs nothing, and skips (or fails, when
``ONNXLRP_REQUIRE_BROWSER=1``, as CI sets it) naming the missing package.
"""
from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

# Schemes a self-contained page may load from; anything else is an external request.
LOCAL_SCHEMES = frozenset({"data", "file", "blob", "about"})

_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")
_INSTALL_HINT = "Debian package 'chromium' (apt-get install -y --no-install-recommends chromium)"


class BrowserError(RuntimeError):
    """Chromium could not be started, crashed, or did not answer in time."""


class Image(NamedTuple):
    src: str  # the first 64 characters of currentSrc/src
    natural_width: int


@dataclass
class PageReport:
    url: str
    console_errors: list[str] = field(default_factory=list)  # console.error/assert, browser log errors
    page_errors: list[str] = field(default_factory=list)  # uncaught exceptions, rejections
    dialogs: list[str] = field(default_factory=list)  # "alert: 1", "confirm: ...", ...
    images: list[Image] = field(default_factory=list)  # every <img> in the main document
    external_requests: list[str] = field(default_factory=list)  # URLs, blocked before sending
    text: str = ""  # document.body.innerText (visible text only)
    elements: dict[str, int] = field(default_factory=dict)  # element counts by tag name
    screenshot: Path | None = None

    @property
    def broken_images(self) -> list[Image]:
        return [image for image in self.images if image.natural_width <= 0]

    def problems(self) -> list[str]:
        """Everything a self-contained, script-free report must not have, one line each."""
        return (
            [f"console error: {m}" for m in self.console_errors]
            + [f"page error: {m}" for m in self.page_errors]
            + [f"dialog: {m}" for m in self.dialogs]
            + [f"image did not load: {i.src}" for i in self.broken_images]
            + [f"external request: {u}" for u in self.external_requests]
        )


def find_chromium() -> str | None:
    """The Chromium binary: $CHROMIUM if set, else Debian's, else one on PATH."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    for candidate in _CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def require_browser() -> str:
    """Skip the calling test (fail under ONNXLRP_REQUIRE_BROWSER=1) without Chromium."""
    import pytest

    path = find_chromium()
    if path is None:
        reason = f"headless Chromium not installed: needs the {_INSTALL_HINT}"
        if os.environ.get("ONNXLRP_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (ONNXLRP_REQUIRE_BROWSER=1)", pytrace=False)
        pytest.skip(reason)
    return path


def _flags(user_data_dir: str, width: int, height: int) -> list[str]:
    return [
        "--headless",
        "--remote-debugging-pipe",
        f"--user-data-dir={user_data_dir}",
        f"--window-size={width},{height}",
        "--no-sandbox",  # CI runs as root, where Chromium refuses its sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--mute-audio",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-component-extensions-with-background-pages",
        "--disable-default-apps",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-domain-reliability",
        "--disable-breakpad",
        "--disable-quic",
        "--password-store=basic",
        "--use-mock-keychain",
        # Belt and braces under the Fetch interception: no name resolves, and everything
        # that would use the network goes to a closed port on loopback.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",
        "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
        "about:blank",
    ]


class Browser:
    """One headless Chromium process; open_page() runs each page in a fresh tab."""

    def __init__(self, executable: str | None = None, *, width: int = 1280, height: int = 800,
                 timeout: float = 30.0):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError(f"headless Chromium not installed: needs the {_INSTALL_HINT}")
        self.width, self.height, self.timeout = width, height, timeout
        self._profile = tempfile.TemporaryDirectory(prefix="onnxlrp-chromium-")
        self._log = tempfile.TemporaryFile()
        cmd_r, self._cmd_w = os.pipe()
        self._resp_r, resp_w = os.pipe()
        # Chromium reads commands on fd 3 and writes answers and events on fd 4.
        argv = ["/bin/sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >&2', self.executable,
                *_flags(self._profile.name, width, height)]
        try:
            self._proc = subprocess.Popen(argv, stdin=cmd_r, stdout=resp_w, stderr=self._log,
                                          start_new_session=True)
        finally:
            os.close(cmd_r)
            os.close(resp_w)
        self._inbox: queue.Queue = queue.Queue()
        self._next_id = 0
        self._handlers: dict[str, Any] = {}  # sessionId -> callable(method, params)
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.call("Browser.getVersion")
        except BaseException:
            self.close()
            raise

    # --- protocol -------------------------------------------------------------------
    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._resp_r, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                self._inbox.put(None)
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._inbox.put(json.loads(message))

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._cmd_w, json.dumps(message).encode() + b"\0")
        except OSError as error:
            raise BrowserError(f"Chromium is gone ({error}){self._stderr()}") from None
        return self._next_id

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        """Send a command and pump events until its answer arrives."""
        wanted = self.send(method, params, session)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            message = self._next(deadline, f"{method}")
            if message.get("id") == wanted:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})

    def pump(self, seconds: float) -> None:
        """Dispatch events for a while (late console messages, dialogs)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                self._next(deadline, None)
            except TimeoutError:
                return

    def _next(self, deadline: float, waiting_for: str | None) -> dict:
        left = deadline - time.monotonic()
        if left <= 0:
            if waiting_for is None:
                raise TimeoutError
            raise BrowserError(f"no answer to {waiting_for} in time{self._stderr()}")
        try:
            message = self._inbox.get(timeout=left)
        except queue.Empty:
            return self._next(deadline, waiting_for)
        if message is None:
            self._inbox.put(None)
            raise BrowserError(f"Chromium exited (code {self._proc.poll()}){self._stderr()}")
        if "method" in message:
            handler = self._handlers.get(message.get("sessionId", ""))
            if handler is not None:
                handler(message.get("sessionId", ""), message["method"], message.get("params", {}))
        return message

    def _stderr(self) -> str:
        try:
            self._log.seek(0)
            tail = self._log.read()[-2000:].decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return f"; Chromium's stderr ends:\n{tail}" if tail else ""

    # --- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self.send("Browser.close")
                self._proc.wait(timeout=5)
            except (BrowserError, subprocess.TimeoutExpired):
                pass
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, 9)  # its own session: Chromium and its children
            except ProcessLookupError:
                pass
            self._proc.wait()
        for fd in (self._cmd_w, self._resp_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        self._profile.cleanup()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- pages -----------------------------------------------------------------------
    def open_page(self, html_path: str | os.PathLike, screenshot: str | os.PathLike | None = None,
                  *, settle: float = 0.2) -> PageReport:
        path = Path(html_path).resolve()
        if not path.is_file():
            raise FileNotFoundError(path)
        report = PageReport(url=path.as_uri())
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        try:
            return self._open(report, target, screenshot, settle)
        finally:
            try:
                self.call("Target.closeTarget", {"targetId": target}, timeout=5)
            except BrowserError:
                pass

    def _open(self, report: PageReport, target: str, screenshot, settle: float) -> PageReport:
        seen: set[str] = set()
        state = {"loaded": False, "crashed": False}

        def external(url: str) -> None:
            if urlsplit(url).scheme.lower() not in LOCAL_SCHEMES and url not in seen:
                seen.add(url)
                report.external_requests.append(url)

        def on_event(session: str, method: str, p: dict) -> None:
            if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                report.console_errors.append(" ".join(_describe(a) for a in p.get("args", [])))
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                entry = p["entry"]
                report.console_errors.append(
                    f"{entry.get('source')}: {entry['text']}" + (f" ({entry['url']})" if entry.get("url") else ""))
            elif method == "Runtime.exceptionThrown":
                details = p["exceptionDetails"]
                exception = details.get("exception") or {}
                report.page_errors.append(exception.get("description") or details.get("text", "?"))
            elif method == "Page.javascriptDialogOpening":
                report.dialogs.append(f"{p['type']}: {p['message']}")
                self.send("Page.handleJavaScriptDialog", {"accept": True}, session)
            elif method == "Network.requestWillBeSent":
                external(p["request"]["url"])
            elif method == "Network.webSocketCreated":
                external(p["url"])
            elif method == "Fetch.requestPaused":
                url = p["request"]["url"]
                if urlsplit(url).scheme.lower() in LOCAL_SCHEMES:
                    self.send("Fetch.continueRequest", {"requestId": p["requestId"]}, session)
                else:
                    external(url)
                    self.send("Fetch.failRequest",
                              {"requestId": p["requestId"], "errorReason": "BlockedByClient"}, session)
            elif method == "Target.attachedToTarget":  # iframes in other processes, workers
                child = p["sessionId"]
                self._handlers[child] = on_event
                for domain in ("Runtime.enable", "Log.enable", "Network.enable", "Page.enable"):
                    self.send(domain, {}, child)
                self.send("Fetch.enable", {"patterns": [{"urlPattern": "*"}]}, child)
                self.send("Target.setAutoAttach",
                          {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True}, child)
                self.send("Runtime.runIfWaitingForDebugger", {}, child)
            elif method == "Page.loadEventFired" and session == main:
                state["loaded"] = True
            elif method in ("Inspector.targetCrashed", "Target.targetCrashed"):
                state["crashed"] = True

        main = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._handlers[main] = on_event
        try:
            for domain in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable", "Inspector.enable"):
                self.call(domain, session=main)
            self.call("Fetch.enable", {"patterns": [{"urlPattern": "*"}]}, main)
            self.call("Target.setAutoAttach",
                      {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True}, main)
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False}, main)
            navigated = self.call("Page.navigate", {"url": report.url}, main)
            if navigated.get("errorText"):
                raise BrowserError(f"could not open {report.url}: {navigated['errorText']}")
            deadline = time.monotonic() + self.timeout
            while not state["loaded"]:
                if state["crashed"]:
                    raise BrowserError(f"the page crashed: {report.url}")
                self._next(deadline, f"the load event of {report.url}")
            # Our own look at the page runs in an isolated world: the page's scripts
            # cannot change what it sees.
            world = self.call("Page.createIsolatedWorld",
                              {"frameId": navigated["frameId"], "worldName": "onnxlrp-harness"},
                              main)["executionContextId"]

            def evaluate(expression: str) -> Any:
                answer = self.call("Runtime.evaluate", {"expression": expression, "contextId": world,
                                                        "awaitPromise": True, "returnByValue": True}, main)
                if "exceptionDetails" in answer:
                    raise BrowserError(f"harness script failed: {answer['exceptionDetails']}")
                return answer["result"].get("value")

            evaluate(_FRAMES)
            # The whole page in the viewport, so that lazy images load and the shot is full.
            metrics = self.call("Page.getLayoutMetrics", session=main)["cssContentSize"]
            full_w = max(self.width, int(metrics["width"] + 0.999))
            full_h = max(self.height, int(metrics["height"] + 0.999))
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": full_w, "height": min(full_h, 16384), "deviceScaleFactor": 1,
                       "mobile": False}, main)
            evaluate(_IMAGES_SETTLED)
            self.pump(settle)
            report.images = [Image(src, int(width)) for src, width in evaluate(_IMAGES)]
            report.text = evaluate("document.body ? document.body.innerText : ''")
            report.elements = evaluate(_ELEMENTS)
            if screenshot is not None:
                shot = self.call("Page.captureScreenshot",
                                 {"format": "png", "captureBeyondViewport": True, "fromSurface": True,
                                  "clip": {"x": 0, "y": 0, "width": full_w, "height": full_h, "scale": 1}},
                                 main)
                report.screenshot = Path(screenshot)
                report.screenshot.parent.mkdir(parents=True, exist_ok=True)
                report.screenshot.write_bytes(base64.b64decode(shot["data"]))
            self.pump(0.05)  # anything the screenshot's relayout set off
            return report
        finally:
            self._handlers.clear()


def _describe(remote: dict) -> str:
    if "value" in remote:
        return str(remote["value"])
    return remote.get("description") or remote.get("unserializableValue") or remote.get("type", "?")


_FRAMES = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
_IMAGES_SETTLED = """Promise.race([
  new Promise(r => setTimeout(r, 5000)),
  Promise.all(Array.from(document.images, i => i.complete ? null : new Promise(r => {
    i.addEventListener('load', r, {once: true}); i.addEventListener('error', r, {once: true});
  }))),
]).then(() => new Promise(r => requestAnimationFrame(() => r())))"""
_IMAGES = "Array.from(document.images, i => [(i.currentSrc || i.getAttribute('src') || '').slice(0, 64), i.complete ? i.naturalWidth : 0])"
_ELEMENTS = """(() => { const n = {}; for (const e of document.getElementsByTagName('*'))
  n[e.localName] = (n[e.localName] || 0) + 1; return n; })()"""


def open_page(html_path: str | os.PathLike, screenshot: str | os.PathLike | None = None, *,
              browser: Browser | None = None, settle: float = 0.2, **launch) -> PageReport:
    """Open one HTML file in headless Chromium (a fresh one unless `browser` is given)."""
    if browser is not None:
        return browser.open_page(html_path, screenshot, settle=settle)
    with Browser(**launch) as fresh:
        return fresh.open_page(html_path, screenshot, settle=settle)
