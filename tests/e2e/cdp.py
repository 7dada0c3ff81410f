"""A headless Chromium driven over the DevTools protocol (`--remote-debugging-pipe`): for tests
that need a real browser to fill a form, follow a redirect and keep a cookie, which
`--dump-dom` alone cannot. Debian's `chromium-headless-shell` (installed by ./deploy/setup).

    with Browser() as b:
        b.open(url)
        b.run("document.querySelector('#key').value = 'fm-...'; document.forms[0].submit()")
        b.wait_for("location.pathname == '/pages/tenants/city-gold'")
        html = b.html()
"""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")


class Browser:
    """One page of a headless Chromium; every call waits for its answer (timeout in seconds)."""

    def __init__(self, timeout: float = 60):
        assert BROWSER, "no headless chromium: apt-get install chromium-headless-shell"
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="flatmesh-cdp-", ignore_cleanup_errors=True)
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()

        def fds():  # the browser reads commands on fd 3 and writes replies on fd 4
            r, w = os.dup(to_browser), os.dup(from_browser)  # neither may be 3 or 4 any more
            os.dup2(r, 3)
            os.dup2(w, 4)

        self._proc = subprocess.Popen(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={self._profile.name}", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buf = b""
        self._next = 0
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:  # the browser and its helper processes, which share its session
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait()
        for fd in (self._commands, self._replies):
            try:
                os.close(fd)
            except OSError:
                pass
        self._profile.cleanup()

    def _call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._commands, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self._buf:
                assert time.monotonic() < deadline, f"{method}: no answer from the browser"
                chunk = os.read(self._replies, 1 << 16)
                assert chunk, f"{method}: the browser went away"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def eval(self, expression: str):
        """The value of a JavaScript expression in the page (run by the test, not the page)."""
        r = self._call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, self._session)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def run(self, statements: str):
        self.eval(f"(() => {{ {statements} }})()")

    def wait_for(self, condition: str):
        """Wait until `condition` holds in a fully loaded page."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:  # a page being replaced answers with an error: not ready yet
                if self.eval(f"document.readyState == 'complete' && !!({condition})"):
                    return
            except AssertionError:
                pass
            assert time.monotonic() < deadline, f"timed out waiting for {condition}"
            time.sleep(0.1)

    def open(self, url: str):
        self._call("Page.navigate", {"url": url}, self._session)
        self.wait_for(f"location.href == {json.dumps(url)}")

    def html(self) -> str:
        return self.eval("document.documentElement.outerHTML")

    def text(self, selector: str) -> str:
        return self.eval(f"document.querySelector({json.dumps(selector)}).textContent.trim()")
