"""The page's time to first recommendations, in headless chromium, and its screenshot.

Starts the real service (`recommender serve`, one worker) on 127.0.0.1 and opens
`/?user=USER` in Debian's chromium driven by Selenium (`apt-get install chromium
chromium-driver`). The time is the page's own `first-recommendations` mark: milliseconds from
navigation start until the user's explained top-10 is on screen, the page's HTML, script, style
sheet, model card, history and explanations all fetched. The first load follows the server's
start (the explainer is built on first use, the browser cache is empty); the rest are warm.

    PYTHONPATH=src python benchmarks/bench_page.py --run runs/demo --screenshot docs/page.png
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.webdriver.support.ui import WebDriverWait

import recommender
from smoke import add_arguments, folder, tiny_run

MARK = "return performance.getEntriesByName('first-recommendations')[0]?.startTime"


def start_server(run: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    src = str(Path(recommender.__file__).parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "recommender", "serve", "--run", run, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the service for {run} did not become ready")


def open_browser(width: int, height: int) -> Any:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        raise SystemExit("no chromium: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage"]:
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def time_to_first_recommendations(browser: Any, url: str) -> float:
    browser.get(url)
    return float(
        WebDriverWait(browser, 60, poll_frequency=0.02).until(lambda b: b.execute_script(MARK))
    )


def screenshot(browser: Any, base: str, user: str, query: str, path: Path) -> int:
    """The page after picking `user`, searching `query` and clicking two hits into a session;
    saved as a 64-colour PNG (a text page loses nothing visible). Returns the file's bytes."""
    browser.set_window_size(1280, 1100)  # tall enough for the user's history
    browser.get(f"{base}/?user={user}")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.execute_script(MARK))
    browser.find_element("id", "search").send_keys(query)
    wait.until(
        lambda b: (
            query.lower() in b.find_element("css selector", "#search-results .title").text.lower()
        )
    )
    for hit in browser.find_elements("css selector", "#search-results li .item")[:2]:
        hit.click()
    wait.until(lambda b: len(b.find_elements("css selector", "#session-recs li")) == 10)
    time.sleep(0.3)  # the second click's list
    image = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    image.quantize(colors=64).save(path, optimize=True)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="run directory to serve (required unless --smoke)")
    parser.add_argument("--user", help="user to open the page on (default: the most active)")
    parser.add_argument("--rounds", type=int, default=10, help="warm page loads timed")
    parser.add_argument("--screenshot", type=Path, help="write the page's screenshot here (PNG)")
    parser.add_argument("--query", default="star wars", help="search shown in the screenshot")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        # A tiny run, two warm loads; where no browser is installed, says so and stops.
        if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
            print("smoke: no chromium here (apt-get install chromium chromium-driver); skipped")
            return
        with folder(args.smoke_dir) as where:
            args.run, args.rounds, args.screenshot, args.out = str(tiny_run(where)), 2, None, None
            measure(args)
        return
    if args.run is None:
        parser.error("--run is required")
    measure(args)


def measure(args: argparse.Namespace) -> None:
    """Time the page's first recommendations on `args.run` and print (and write) the figures."""
    proc, base = start_server(args.run)
    browser = open_browser(1280, 860)
    try:
        user = args.user or httpx.get(f"{base}/v1/users?limit=1").json()["user_ids"][0]
        url = f"{base}/?user={user}"
        cold = time_to_first_recommendations(browser, url)
        warm = [time_to_first_recommendations(browser, url) for _ in range(args.rounds)]
        result = {
            "run": args.run,
            "user": user,
            "browser": browser.capabilities.get("browserVersion"),
            "first_load_ms": round(cold, 1),
            "warm_median_ms": round(float(np.median(warm)), 1),
            "warm_p90_ms": round(float(np.percentile(warm, 90)), 1),
            "rounds": args.rounds,
        }
        if args.screenshot:
            size = screenshot(browser, base, user, args.query, args.screenshot)
            result["screenshot"] = f"{args.screenshot} ({size / 1024:.0f} KiB)"
    finally:
        browser.quit()
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
