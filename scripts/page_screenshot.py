"""The README's picture of the search page: `metaembed serve` on a real index, one query, a screenshot.

    python scripts/page_screenshot.py --model models/metaembed-mini --index /tmp/clipart-index \
        --image-dir data/openclipart --query "a red bicycle" --budget 4x8 --out docs/search-page.png

Starts the service on a free port of 127.0.0.1, drives headless chromium (tests/serve/browser.py), and stops
the service again.
"""

from __future__ import annotations

import argparse
import runpy
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
browser = runpy.run_path(str(ROOT / "tests" / "serve" / "browser.py"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--image-dir", required=True)
    parser.add_argument("--query", default="a red bicycle")
    parser.add_argument("--budget", default="4x8")
    parser.add_argument("--out", default="docs/search-page.png")
    args = parser.parse_args()
    if reason := browser["missing"]():
        sys.exit(f"page_screenshot: {reason}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "metaembed.cli", "serve", "--model", args.model, "--index", args.index,
               "--image-dir", args.image_dir, "--port", str(port), "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("page_screenshot: the server stopped; see its output above")
                time.sleep(0.2)
        with browser["chromium"](1280, 1000) as driver:
            driver.get(url + "/")
            browser["wait_for"](driver, lambda d: d.find_element("id", "budget-label").text, what="the ladder")
            slider = driver.find_element("id", "budget")
            labels = [t.text for t in driver.find_elements("css selector", "#ticks span")]
            driver.execute_script(
                "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                slider,
                labels.index(args.budget),
            )
            driver.find_element("id", "query").send_keys(args.query + "\n")
            browser["wait_for"](driver, lambda d: browser["searches"](d) >= 1, what="the search")
            images = driver.find_elements("css selector", "#results .hit img")
            browser["wait_for"](driver, lambda d: all(i.get_property("naturalWidth") > 0 for i in images))
            driver.save_screenshot(args.out)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"page_screenshot: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
