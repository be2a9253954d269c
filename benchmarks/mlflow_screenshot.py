"""Look at a heal's MLflow store in a real browser: headless Chromium against `mlflow ui`.

Starts `mlflow ui` on a free port against the store of a demo (or any heal), opens the
parent run's overview, its trade-off plot, its system metrics and the experiment page in the
model-training view, checks in the rendered pages that the description (the before/after
table, k* and α, the guard's reason), the kept step's metrics, the child runs ``k=NNN``
with the chosen one marked, the dataset inputs and the logged model are there and that no
``curve/`` metric sits on the parent, and writes the screenshots (plus one composite PNG for
the README).

    python benchmarks/mlflow_screenshot.py runs/demo                 # after `make demo`
    python benchmarks/mlflow_screenshot.py runs/demo --png docs/mlflow-demo.png

Prints one line per check and exits 1 if one fails; exits 2 with a reason when no
Chromium is installed (Debian: `apt-get install chromium`; ``install_browser`` does that).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def install_browser() -> str | None:
    """Chromium, installed with apt-get (Debian, as root) when none is on PATH; None if that
    is not possible here."""
    if find_browser() is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
                break
    return find_browser()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(uri: str, port: int, log: Path) -> subprocess.Popen:
    from potion.tracking.store import mlflow_executable

    cmd = [*mlflow_executable(), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"mlflow ui did not answer on port {port} within 120 s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server we started (its own process group: the UI runs worker processes)."""
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass


# What a first visit would otherwise pop up over the page (MLflow 3.17 keys, "<key>_v1").
UI_STORAGE = {
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.assistant.panelOpen_v1": "false",
}


class Chromium:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client):
    load a page, wait for what should be on it, read its text, take a screenshot."""

    def __init__(self, browser: str, size=(1500, 1000)):
        self.profile = tempfile.mkdtemp(prefix="potion-chromium-")
        self.size = size
        self.proc = subprocess.Popen(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", f"--window-size={size[0]},{size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not open its DevTools port within 60 s")
            time.sleep(0.2)
        self.port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.ws_url = page["webSocketDebuggerUrl"]
        self._id = 0
        self.loop.run_until_complete(self._connect())
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                  mobile=False)

    async def _connect(self):
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.ws_url, max_msg_size=0)

    async def _call(self, method: str, params: dict):
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=120)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def call(self, method: str, **params):
        return self.loop.run_until_complete(self._call(method, params))

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    def goto(self, url: str, ready_js: str, timeout: float = 90.0) -> bool:
        """Load ``url``; wait until ``ready_js`` is true (the single-page app fetches and
        draws after the load event), at most ``timeout`` seconds. True when it became so."""
        self.call("Page.navigate", url=url)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.js(f"Boolean({ready_js})"):
                time.sleep(1.0)  # let animations and late charts settle before a screenshot
                return True
            time.sleep(0.5)
        return False

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, png: Path, height: int | None = None) -> None:
        import base64

        params = {"format": "png"}
        if height:
            params.update(clip={"x": 0, "y": 0, "width": self.size[0], "height": height, "scale": 1},
                          captureBeyondViewport=True)
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.loop.run_until_complete(self.ws.close())
                self.loop.run_until_complete(self.session.close())
        except Exception:  # noqa: BLE001  (closing a browser that already went away)
            pass
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


def has_text(*needles: str) -> str:
    """A JS condition: the page's text contains every needle."""
    return " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in needles)


def compose(top: Path, bottom: Path, out: Path, width: int = 1100) -> None:
    """Two screenshots stacked, scaled to ``width``, saved as a small palette PNG."""
    from PIL import Image

    imgs = [Image.open(p).convert("RGB") for p in (top, bottom)]
    imgs = [im.resize((width, round(im.height * width / im.width)), Image.LANCZOS) for im in imgs]
    sheet = Image.new("RGB", (width, sum(im.height for im in imgs) + 8), "white")
    y = 0
    for im in imgs:
        sheet.paste(im, (0, y))
        y += im.height + 8
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def find_store(folder: Path) -> tuple[str, dict]:
    """The tracking URI and the MLflow ids of the heal in ``folder`` (a demo or heal output)."""
    for report in (folder / "heal" / "report.json", folder / "report.json"):
        if report.is_file():
            mlf = json.loads(report.read_text()).get("mlflow")
            if mlf:
                return mlf["tracking_uri"], mlf
    raise SystemExit(f"no report.json with MLflow ids under {folder} (run `make demo` first)")


def check_pages(folder: Path, shots: Path, browser: str, png: Path | None = None,
                screenshots: bool = True) -> list[tuple[str, bool]]:
    """Serve the store of the heal in ``folder``, render its pages, return (check, passed)."""
    from mlflow import MlflowClient

    from potion.tracking.store import ui_url

    uri, mlf = find_store(folder)
    eid, rid = mlf["experiment_id"], mlf["parent_run_id"]
    client = MlflowClient(tracking_uri=uri)
    model_names = [m.name for m in client.search_logged_models(experiment_ids=[eid])]
    model = model_names[0] if model_names else "(no logged model in the store)"
    note = client.get_run(rid).data.tags.get("mlflow.note.content", "")
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_ui(uri, port, shots / "mlflow-ui.log")
    base = f"http://127.0.0.1:{port}"
    run_page = ui_url(base, eid, rid)
    checks: list[tuple[str, bool]] = []
    chrome = Chromium(browser)
    try:
        chrome.goto(base + "/", "document.readyState === 'complete'")
        chrome.js(";".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)})" for k, v in UI_STORAGE.items()))

        ok = chrome.goto(run_page, has_text("after_poison_healed", model, "poison healed"))
        text = chrome.text()
        checks += [
            ("run page: opens in the model-training view", ok and "Traces 0" not in text and "Metrics (" in text),
            ("run page: the description: before/after table, k* and α, the guard's reason",
             all(k in text for k in ("clean accuracy", "poison healed", "Kept step", "α ="))
             and ("Damage guard:" not in note or "Damage guard" in text)),
            ("run page: the kept step's metrics (k_star, acc_forget, threshold)",
             all(k in text for k in ("k_star", "acc_forget", "threshold"))),
            ("run page: before/after metrics", "after_poison_healed" in text and "before_clean_acc" in text),
            ("run page: no curve/ metric on the parent", "curve/" not in text),
            ("run page: child runs named k=NNN, the chosen one marked",
             re.search(r"k=\d{3}", text) is not None and "✓ chosen" in text),
            ("run page: the training data and the deletion set as dataset inputs", "deletion set" in text),
            ("run page: Source and Created by", "potion" in text and "Created by" in text),
            ("run page: the logged model is listed", model in text),
        ]
        if screenshots:
            chrome.screenshot(shots / "run-overview.png")

        plot = run_page.replace(f"/runs/{rid}?", f"/runs/{rid}/artifacts/plots/ptn_tradeoff.png?")
        # the artifact viewer loads the image through get-artifact (or a blob URL): any image as
        # wide as the plot (the UI's own icons are far smaller) is the plot, drawn
        ok = chrome.goto(plot, "Array.from(document.images).some(i => i.complete && i.naturalWidth >= 400)")
        checks.append(("artifacts: the trade-off plot renders", ok))
        if screenshots:
            chrome.screenshot(shots / "run-plot.png")

        charts = run_page.replace(f"/runs/{rid}?", f"/runs/{rid}/system-metrics?")
        ok = chrome.goto(charts, has_text("cpu_utilization_percentage"))
        checks.append(("system metrics: CPU utilisation recorded", ok))
        if screenshots:
            chrome.screenshot(shots / "run-system-metrics.png")

        # the children sit folded under their parent (the run page lists them by name)
        runs = len(client.search_runs([eid]))
        ok = chrome.goto(ui_url(base, eid), has_text(client.get_run(rid).info.run_name, f"{runs} matching runs"))
        checks.append(("experiment page: the heal's parent run is listed, with its children counted", ok))
        if screenshots:
            chrome.screenshot(shots / "experiment.png")

        models = ui_url(base, eid).replace(f"/experiments/{eid}?", f"/experiments/{eid}/models?")
        checks.append(("experiment models tab: the logged model", chrome.goto(models, has_text(model))))
        if screenshots:
            chrome.screenshot(shots / "experiment-models.png")
    finally:
        chrome.close()
        stop(proc)
    if png is not None and screenshots:
        compose(shots / "run-overview.png", shots / "run-plot.png", png)
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default="runs/demo", help="a demo or heal output folder (default runs/demo)")
    ap.add_argument("--shots", default=None, help="folder for the screenshots (default: FOLDER/screenshots)")
    ap.add_argument("--png", default=None, help="also write the composite PNG here, e.g. docs/mlflow-demo.png "
                    "(default: none)")
    args = ap.parse_args(argv)
    browser = install_browser()
    if browser is None:
        print("no Chromium/Chrome found (looked for: " + ", ".join(BROWSERS) + "); on Debian: "
              "apt-get install chromium", file=sys.stderr)
        return 2
    folder = Path(args.folder)
    shots = Path(args.shots) if args.shots else folder / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    checks = check_pages(folder, shots, browser, Path(args.png) if args.png else None)
    for what, ok in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    print(f"screenshots in {shots} ({time.perf_counter() - t0:.0f} s)")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
