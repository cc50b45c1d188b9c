"""Takes the README's dashboard screenshots with the headless Chromium the browser tests use:

    .venv/bin/python tests/dashboard_screenshots.py [--rounds 8] [--epochs 3] [--out docs]

A dev validator, Redis, a CouchDB-protocol server, two compute nodes and five IoT nodes run a
federated-digits workflow (iot-5's updates poisoned x100 and rejected by the update checks), as
in tests/test_dashboard.py; then the workflow page, a round page with its audit and the nodes
page are saved as PNG in --out (docs/dashboard-workflow.png, dashboard-round.png, dashboard-nodes.png).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from helpers.devnet_process import DevnetProcess  # noqa: E402
from helpers.ledger_helpers import run  # noqa: E402
from test_dashboard import DashboardProcess, _endpoint_flags, _wait, federate  # noqa: E402
from trustmesh.stores.servers import CouchServer, RedisServer  # noqa: E402


def shoot(browser, url: str, path: pathlib.Path, *, wait_for: str | None = None) -> None:
    browser.set_window_size(1280, 1000)
    browser.get(url)
    if wait_for:
        _wait(lambda: browser.find_elements("css selector", wait_for), 60)
    _wait(lambda: browser.find_element("id", "live").text == "live", 15)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height + 16, 3000))
    time.sleep(0.3)
    browser.save_screenshot(str(path))
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                 "--force-device-scale-factor=1"):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as folder, RedisServer() as redis_server, CouchServer() as couch_server:
        folder = pathlib.Path(folder)
        stores = (redis_server, couch_server)
        chain = DevnetProcess(folder / "devnet").start()
        dashboard = DashboardProcess("--bind", "127.0.0.1:0", *_endpoint_flags(chain, stores),
                                     log=folder / "dashboard.log")
        browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            workflow_id = "federated-digits-demo"

            def open_page():
                browser.get(dashboard.url + f"workflows/{workflow_id}")

            import asyncio

            run(federate(chain, stores, folder, workflow_id, rounds=args.rounds, epochs=args.epochs,
                         before_nodes=lambda: asyncio.to_thread(open_page)), timeout=600)
            shoot(browser, dashboard.url + f"workflows/{workflow_id}", out / "dashboard-workflow.png")
            shoot(browser, dashboard.url + f"workflows/{workflow_id}/rounds/{args.rounds}?audit=1",
                  out / "dashboard-round.png", wait_for="#audit-verdict")
            shoot(browser, dashboard.url + "nodes", out / "dashboard-nodes.png")
        finally:
            browser.quit()
            dashboard.stop()
            chain.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
