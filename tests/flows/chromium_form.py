"""A deployment's "Custom run" form as a browser renders it: Debian's headless Chromium driven over
the DevTools protocol (a websocket; no browser download, no extra Python package), logged in to an
authenticated server the way the UI does it (the auth string in the browser's local storage)."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

#: what the page reports: its height, the field labels in order, the UI's 'Property is type "None"' lines
_REPORT_JS = """(() => {
  const text = document.body.innerText;
  return {height: document.documentElement.scrollHeight,
          labels: [...document.querySelectorAll('label')].map(l => l.innerText.trim()).filter(Boolean),
          none_lines: (text.match(/Property is type "None"/g) || []).length,
          text: text};
})()"""


class _Page:
    def __init__(self, ws):
        self.ws, self.n = ws, 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                         awaitPromise=True).get("result", {}).get("value")


@contextlib.contextmanager
def chromium_page(port: int):
    """A headless Chromium page (a throwaway profile) driven through its DevTools websocket."""
    from websockets.sync.client import connect

    browser = shutil.which("chromium")
    assert browser, "this test needs Debian's chromium (apt-get install chromium); .ci/run installs it"
    profile = tempfile.mkdtemp(prefix="egpt-chromium-")
    proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                             f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5))
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "chromium did not start"
                time.sleep(0.3)
        url = next(t["webSocketDebuggerUrl"] for t in tabs if t["type"] == "page")
        with connect(url, max_size=None, open_timeout=30) as ws:
            page = _Page(ws)
            page.call("Page.enable")
            yield page
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(profile, ignore_errors=True)


def custom_run_form(page: _Page, ui: str, auth: str, deployment_id: str, screenshot: Path | None = None,
                    timeout_s: float = 90) -> dict:
    """Log in, open /deployments/deployment/<id>/run of the v2 UI, wait until its form has settled;
    returns {"height", "labels", "none_lines", "text"} (and writes a screenshot)."""
    page.call("Page.navigate", url=f"{ui}/v2/")
    deadline = time.monotonic() + timeout_s
    while page.js("document.readyState") != "complete" and time.monotonic() < deadline:
        time.sleep(0.5)
    page.js(f"localStorage.setItem('prefect-password', {json.dumps(base64.b64encode(auth.encode()).decode())})")
    page.call("Page.navigate", url=f"{ui}/v2/deployments/deployment/{deployment_id}/run")
    last, stable_since, report = None, time.monotonic(), {"height": 0, "labels": [], "none_lines": 0, "text": ""}
    while time.monotonic() < deadline:  # the form is built from several API answers: wait until it stops changing
        report = page.js(_REPORT_JS)
        if not report:  # the page is still loading (no document to evaluate in yet)
            time.sleep(1)
            continue
        key = (report["height"], len(report["labels"]))
        if key != last:
            last, stable_since = key, time.monotonic()
        elif len(report["labels"]) > 5 and time.monotonic() - stable_since > 5:
            break
        time.sleep(1)
    if screenshot is not None:
        page.call("Emulation.setDeviceMetricsOverride", width=1400, height=min(int(report["height"]), 16000),
                  deviceScaleFactor=0.5, mobile=False)
        shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    return report


def submit_form(page: _Page) -> None:
    """Press the Custom-run form's Submit button as a user would (the form left as it is)."""
    clicked = page.js("(() => { const b = [...document.querySelectorAll('button[type=submit]')]"
                      ".find(b => b.innerText.trim() === 'Submit'); if (b) { b.click(); return true; } return false; })()")
    assert clicked, "the form has no Submit button"
