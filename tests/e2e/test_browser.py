"""The MLflow UI in a real browser: a real ``mlflow server`` (sqlite in tmp_path), the smoke sweep
logged to it over HTTP, and headless Chromium driven through the DevTools protocol (a websocket via
aiohttp, which MLflow already depends on: no webdriver needed).

Checks that the experiment, the sweep's parent run, its child runs (expanded in the runs table) and
their loss-weight params (compare view) are shown, and that the chart view shows the trials'
prediction images. Screenshots go to ``results/screenshots/``. Skipped where Chromium is not installed
(``.ci/run`` installs it on Debian/Ubuntu CI machines).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "results" / "screenshots"
SMOKE = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.slow, pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (on Debian/Ubuntu: "
                                                "apt-get install chromium chromium-driver; .ci/run does it as root)"),
]


# ----- an MLflow server ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f}s" + (f":\n{log.read_text()[-3000:]}" if log else ""))


class MlflowServer:
    """``mlflow server`` on a free port; stop() ends its process group (the server and its workers)."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow-server.log"
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe) if exe.is_file() else "mlflow", "server", "--backend-store-uri",
               f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # the UI needs no job consumers (7 busy processes)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        try:
            wait_http(f"{self.uri}/health", 180, self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM the server's process group (uvicorn, job consumers), SIGKILL what is left after 20 s."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)  # anyone of the group still there?
            except ProcessLookupError:
                break
            self.proc.poll()  # reap the leader
            time.sleep(0.3)
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


# ----- a minimal DevTools-protocol client -----------------------------------------------------------------
class Browser:
    """Headless Chromium with one page, driven over the DevTools websocket (async)."""

    def __init__(self, exe: str, width: int = 1440, height: int = 1000):
        self.exe, self.width, self.height = exe, width, height
        self.profile = Path(tempfile.mkdtemp(prefix="losstune-chromium-"))
        self.proc: subprocess.Popen | None = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> "Browser":
        import aiohttp
        port_file = self.profile / "DevToolsActivePort"
        self.proc = subprocess.Popen(
            [self.exe, *CHROME_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit code {self.proc.poll()})")
            await asyncio.sleep(0.2)
        port, path = port_file.read_text().split()[:2]
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        self.session = attached["sessionId"]
        await self.send("Page.enable", session=True)
        await self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                                "deviceScaleFactor": 1, "mobile": False},
                        session=True)
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self.send("Browser.close")
        except Exception:  # noqa: BLE001
            pass
        await self.http.close()
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def send(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 60):
        msg_id = next(self._ids)
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        await self.ws.send_str(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            reply = await self.ws.receive_json(timeout=max(0.1, deadline - time.monotonic()))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url}, session=True)

    async def js(self, expression: str):
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = (details.get("exception") or {}).get("description") or details.get("text")
            raise RuntimeError(f"JS error in {expression[:200]!r}: {text}")
        return result.get("result", {}).get("value")

    async def text(self) -> str:
        return await self.js("document.body ? document.body.innerText : ''") or ""

    async def wait_for(self, predicate: str, timeout: float = 60, what: str = "") -> None:
        """Poll a JS boolean expression until true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if await self.js(f"Boolean({predicate})"):
                    return
            except RuntimeError:
                pass
            await asyncio.sleep(0.5)
        text = (await self.text())[:3000]
        raise AssertionError(f"timed out waiting for {what or predicate}; the page shows:\n{text}")

    async def wait_text(self, needles, timeout: float = 60) -> None:
        checks = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in needles)
        await self.wait_for(f"document.body && {checks}", timeout, what=f"text {list(needles)}")

    async def click(self, element_js: str, timeout: float = 15) -> None:
        """A real mouse click (pointer events, as menus expect) at the centre of the element (waits for it)."""
        box, deadline = None, time.monotonic() + timeout
        while box is None and time.monotonic() < deadline:
            try:
                box = await self.js(f"""(() => {{ const e = {element_js}; if (!e) return null;
                    e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
                    return r.width > 0 ? [r.left + r.width / 2, r.top + r.height / 2] : null; }})()""")
            except RuntimeError:  # the page re-rendered under us: look again
                box = None
            if box is None:
                await asyncio.sleep(0.3)
        if not box:
            raise AssertionError(f"nothing to click: {element_js}; the page shows:\n{(await self.text())[:2000]}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                         "clickCount": 1}, session=True)

    async def wait_still(self, element_js: str, timeout: float = 10) -> None:
        """Wait until the element's box is the same in two looks 0.3 s apart (an opening dialog moves)."""
        rect = f"(() => {{ const r = {element_js}.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }})()"
        deadline, before = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            now = await self.js(rect)
            if now == before:
                return
            before = now
            await asyncio.sleep(0.3)

    async def key(self, key: str) -> None:
        codes = {"Tab": 9, "Enter": 13, "Escape": 27}
        for kind in ("keyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": key,
                                                       "windowsVirtualKeyCode": codes[key]}, session=True)

    async def screenshot(self, path: Path) -> Path:
        data = await self.send("Page.captureScreenshot", {"format": "png"}, session=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    async def close_side_panels(self) -> bool:
        """Close MLflow's assistant side panel if it is open (more room for the runs)."""
        close = "document.querySelector('button[aria-label=\"Close\"]:not([role=dialog] *)')"
        if await self.js(f"Boolean({close})"):
            await self.click(close)
            return True
        return False


async def check_mlflow_ui(base: str, exp, parent, children, out: Path = SCREENSHOTS,
                          min_images: int | None = None) -> dict[str, Path]:
    """Open the sweep in the MLflow UI at ``base``; assert what is shown; screenshots into ``out``.

    ``min_images``: prediction images expected at the last step (default: one per child run).
    """
    child_names = [c.info.run_name for c in children]
    shots = {}
    async with Browser(CHROMIUM) as b:
        # the experiment's runs table: experiment + parent run; expand it to show the child runs
        await b.goto(f"{base}/#/experiments/{exp.experiment_id}/runs")
        await b.wait_text([exp.name, parent.info.run_name], timeout=90)
        await b.close_side_panels()
        expander = 'document.querySelector(\'button[data-component-id*="runnamecellrenderer"]\')'
        await b.wait_for(expander, 30, "the parent run's expand button")
        await b.click(expander)
        await b.wait_text(child_names, timeout=30)
        shots["runs"] = await b.screenshot(out / "mlflow_runs.png")

        # the chart view of the same runs: an image grid of the trials' predictions (log_image key)
        chart = "document.querySelector('input[name=runs-view-mode][value=CHART]')"
        await b.click(f"({chart} && ({chart}.closest('label') || {chart}.parentElement))")
        search = "document.querySelector('input[placeholder=\"Search metric charts\"]')"
        await b.wait_for(search, 30, "the chart search box")
        await b.click(search)
        await b.send("Input.insertText", {"text": "predictions"}, session=True)
        loaded = ("[...document.images].filter(i => /images.predictions/.test(decodeURIComponent(i.src))"
                  " && i.complete && i.naturalWidth > 0).length")
        await b.wait_text(["predictions"], 60)  # the image-grid card MLflow made for the image key
        # with several steps (epochs) logged, the grid starts at step 0: go to the last epoch
        await set_last_step(b)
        want = len(children) if min_images is None else min_images
        await b.wait_for(f"{loaded} >= {want}", 60, f"{want} prediction images in the full-screen image grid")
        await asyncio.sleep(0.5)
        shots["charts"] = await b.screenshot(out / "mlflow_charts.png")
        await b.click("document.querySelector('[role=dialog] button[aria-label=\"Close\"]')")
        await b.wait_for("!document.querySelector('[role=dialog]')", 10, "the image grid to close")

        # the compare view of the child runs: run names and their loss-weight params side by side
        ids = urllib.parse.quote(json.dumps([c.info.run_id for c in children]))
        exps = urllib.parse.quote(json.dumps([exp.experiment_id]))
        await b.goto(f"{base}/#/compare-runs?runs={ids}&experiments={exps}")
        await b.wait_text([*child_names, "gradient_weight", "lr", "model.hidden_channels"], timeout=90)
        text = await b.text()
        for child in children:  # each child's sampled gradient weight is in the params table
            value = child.data.params["gradient_weight"]
            assert value[:5] in text, (value, text[:2000])
        await b.close_side_panels()
        shots["compare"] = await b.screenshot(out / "mlflow_compare.png")
    return shots


FULLSCREEN = "document.querySelector('button[data-component-id=fullscreen_button_chartcard]')"
STEP_BOX = "document.querySelector('[role=dialog] input[type=number]')"


async def set_last_step(b: Browser, tries: int = 5) -> None:
    """Open the image card full-screen and type its last step into the step box.

    A click that lands while the dialog is still animating in can hit the overlay, which closes the
    dialog; React may also re-render the box while we type. So: wait until the box stands still, type,
    and check both that the dialog is still open and that the box holds the value; else open it again.
    """
    ready = f"{STEP_BOX} && {STEP_BOX}.max && {STEP_BOX}.max != '-Infinity'"
    for _ in range(tries):
        try:
            if not await b.js(f"Boolean({STEP_BOX})"):
                await b.click(FULLSCREEN)
            await b.wait_for(ready, 60, "the image grid's step box")
            await b.wait_still(STEP_BOX)
            await b.click(STEP_BOX)
            await b.js(f"{STEP_BOX}.select()")
            last = str(await b.js(f"{STEP_BOX}.max"))
            await b.send("Input.insertText", {"text": last}, session=True)
            await b.key("Tab")  # the box applies its value on blur
            await asyncio.sleep(0.5)
            if await b.js(f"{STEP_BOX} && {STEP_BOX}.value") == last:
                return
        except (RuntimeError, AssertionError):
            pass
        await asyncio.sleep(1)
    raise AssertionError(f"could not set the image grid to its last step; the page shows:\n{(await b.text())[:2000]}")


# ----- the test ----------------------------------------------------------------------------------------------
@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    yield server
    server.stop()


def _run_smoke(tmp_path: Path, uri: str) -> Path:
    from losstune.search.cli import main
    cfg = yaml.safe_load(yaml.safe_dump(SMOKE))
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["sweep", str(path), "--results-dir", str(tmp_path / "res"), "--tracking-uri", uri]) == 0
    return tmp_path / "res" / cfg["name"]


def test_mlflow_ui_shows_the_sweep(tmp_path, ray_local, clean_env, mlflow_server):
    pytest.importorskip("aiohttp", reason="the DevTools client needs aiohttp (an MLflow dependency)")
    sweep_dir = _run_smoke(tmp_path, mlflow_server.uri)
    info = json.loads((sweep_dir / "sweep.json").read_text())
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(SMOKE["mlflow"]["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.info.run_id == info["parent_run_id"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == SMOKE["search"]["num_samples"]

    shots = asyncio.run(check_mlflow_ui(mlflow_server.uri, exp, parent, children))
    from PIL import Image
    for name, path in shots.items():
        with Image.open(path) as im:
            assert im.size == (1440, 1000), (name, im.size)
    assert set(shots) == {"runs", "charts", "compare"}
