"""Screenshots of what a user sees in the Prefect UI, taken in a real (headless) browser.

Starts a local Prefect server, deploys the flows, runs a small extraction through the CLI against the
server, then opens the extract deployment's run form and the finished run's artifacts in Chromium and
saves PNGs next to this file. Needs Debian's chromium and the playwright package (no browser download):

    apt-get install chromium && pip install playwright
    python docs/screenshots.py
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
BIN = Path(sys.executable).parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# the flags a headless Chromium needs on a machine with no network but loopback
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, timeout: float = 300) -> str:
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="np-screens-"))
    port = _free_port()
    ui = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(work / "home"), "PREFECT_API_URL": f"{ui}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        for _ in range(360):  # up to 3 minutes
            try:
                if httpx.get(f"{ui}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        prefect = str(BIN / "prefect")
        _run([prefect, "work-pool", "create", "local-process", "--type", "process"], env)
        _run([prefect, "work-pool", "create", "gpu-k8s", "--type", "kubernetes", "--base-job-template",
              str(REPO / "infra" / "k8s" / "base-job-template.json")], env)
        _run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env)
        # a finished run with artifacts: the demo's corpus, extracted by the CLI reporting to this server
        _run([str(BIN / "neuropredictor"), "demo", "--out", str(work / "demo")], env, timeout=600)
        with httpx.Client(base_url=f"{ui}/api", timeout=30) as api:
            deployment = api.get("/deployments/name/extract/local").raise_for_status().json()
            runs = api.post("/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1,
                                                         "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}).json()
            run = runs[0]
            artifacts = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
        by_kind = {kind: next(a for a in artifacts if a["key"].startswith(f"{kind}-"))
                   for kind in ("extract-layers", "extract-summary")}  # keyed by kind and store
        # (file, page, a tab to click first)
        pages = [
            ("ui-run-form.png", f"{ui}/deployments/deployment/{deployment['id']}/run", None),
            ("ui-artifacts.png", f"{ui}/runs/flow-run/{run['id']}", "Artifacts"),
            ("ui-layers-table.png", f"{ui}/artifacts/artifact/{by_kind['extract-layers']['id']}", None),
            ("ui-summary.png", f"{ui}/artifacts/artifact/{by_kind['extract-summary']['id']}", None),
        ]
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            for name, url, tab in pages:
                page.goto(url, wait_until="networkidle", timeout=60_000)
                if tab:
                    page.get_by_text(tab, exact=True).first.click(timeout=30_000)
                page.wait_for_timeout(2000)  # let the UI's charts and markdown settle
                page.screenshot(path=str(DOCS / name), full_page=True)
                print("saved", DOCS / name)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
