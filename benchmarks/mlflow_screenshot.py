"""Look at a heal's MLflow store in a real browser: headless Chromium against `mlflow ui`.

Starts `mlflow ui` on a free port against the store of a demo (or any heal), opens the
parent run's overview, its metric charts and the experiment page in the model-training
view, checks in the rendered pages that the trade-off curve (``curve/acc_forget``), the
chosen step's metrics, the before/after metrics, the child runs ``k=NNN`` and the logged
model are there, and writes the screenshots (plus one composite PNG for the README).

    python benchmarks/mlflow_screenshot.py runs/demo                 # after `make demo`
    python benchmarks/mlflow_screenshot.py runs/demo --png docs/mlflow-demo.png

Prints one line per check and exits 1 if one fails; exits 2 with a reason when no
Chromium is installed (Debian: `apt-get install chromium`).
"""
from __future__ import annotations

import argparse
import json
import os
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(uri: str, port: int, log: Path) -> subprocess.Popen:
    from potion.pipeline.tracking import mlflow_executable

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


def browse(browser: str, url: str, png: Path | None, size=(1500, 1000), budget_ms: int = 25000) -> str:
    """Render ``url`` (the UI is a single-page app: give it virtual time to fetch and draw);
    return the DOM, and write a screenshot when ``png`` is given."""
    profile = tempfile.mkdtemp(prefix="potion-chromium-")
    base = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={budget_ms}"]
    try:
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        if png is not None:
            png.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([*base, f"--screenshot={png}", url], capture_output=True, timeout=180, check=True)
        return dom
    finally:
        shutil.rmtree(profile, ignore_errors=True)


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


def check_pages(folder: Path, shots: Path, browser: str, png: Path | None = None) -> list[tuple[str, bool]]:
    from mlflow import MlflowClient

    from potion.pipeline.tracking import ui_url

    uri, mlf = find_store(folder)
    eid, rid = mlf["experiment_id"], mlf["parent_run_id"]
    client = MlflowClient(tracking_uri=uri)
    model_names = [m.name for m in client.search_logged_models(experiment_ids=[eid])]
    port = free_port()
    proc = start_ui(uri, port, shots / "mlflow-ui.log")
    base = f"http://127.0.0.1:{port}"
    try:
        overview = browse(browser, ui_url(base, eid, rid), shots / "run-overview.png")
        charts = browse(browser, ui_url(base, eid, rid).replace(f"/runs/{rid}?", f"/runs/{rid}/model-metrics?"),
                        shots / "run-metrics.png", size=(1500, 1300))
        experiment = browse(browser, ui_url(base, eid), shots / "experiment.png")
        models = browse(browser, ui_url(base, eid).replace(f"/experiments/{eid}?", f"/experiments/{eid}/models?"),
                        shots / "experiment-models.png")
    finally:
        stop(proc)
    checks = [
        ("run page: the model-training view, not GenAI traces", "Traces 0" not in overview and "Overview" in overview),
        ("run page: the chosen step's metrics (k_star, acc_forget)", "k_star" in overview and "acc_forget" in overview),
        ("run page: before/after metrics", "after_poison_healed" in overview and "before_clean_acc" in overview),
        ("run page: the logged model is listed", bool(model_names) and model_names[0] in overview),
        ("metric charts: the trade-off curve curve/acc_forget", "curve/acc_forget" in charts),
        ("experiment page: child runs named k=NNN", "k=000" in experiment),
        ("experiment models tab: the logged model", bool(model_names) and model_names[0] in models),
    ]
    if png is not None:
        compose(shots / "run-overview.png", shots / "run-metrics.png", png)
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default="runs/demo", help="a demo or heal output folder (default runs/demo)")
    ap.add_argument("--shots", default=None, help="folder for the screenshots (default: FOLDER/screenshots)")
    ap.add_argument("--png", default=None, help="also write the composite PNG here, e.g. docs/mlflow-demo.png "
                    "(default: none)")
    args = ap.parse_args(argv)
    browser = find_browser()
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
