#!/usr/bin/env python3
"""
JupyterLab's /lab cold load in Chromium, direct versus through the ingress.

    python3 bench/lab_load.py [--loads 3] [--mode header|uri]

Starts JupyterLab and the ingress (a real twistd process, file provider)
with the settings of C{e2e/} for the mode, and Debian's Chromium through
Playwright.  After one unmeasured load each way (the server's first render
of the page), it loads C{/lab} --loads times each way, interleaved (direct,
ingress, direct, ...), each in a fresh browser context (no cache, no
cookie: Jupyter's token is in the URL, as on a first visit), and reports
per load: the page's C{load} event and the moment the launcher is shown
(the app is usable), both from the navigation start, plus the requests and
bytes the page fetched.  Bounded in time (--timeout); stops what it started.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from playwright.sync_api import sync_playwright  # noqa: E402

from e2e.harness import HEADER, TOKEN, URI, Ingress, Jupyter, launch_chromium  # noqa: E402


def load_once(browser: Any, url: str, timeout_s: float) -> dict[str, float]:
    """One cold load of C{url} in a fresh context: timings in ms, requests, bytes."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.set_default_timeout(timeout_s * 1000)
        requests = []
        page.on("requestfinished", lambda request: requests.append(request))
        started = time.monotonic()
        page.goto(url, wait_until="load")
        loaded = time.monotonic()
        page.locator(".jp-LauncherCard").first.wait_for(state="visible")
        usable = time.monotonic()
        sizes = 0
        for request in requests:
            try:
                sizes += request.sizes()["responseBodySize"]
            except Exception:  # a request whose sizes the browser no longer has
                pass
        return {
            "load_ms": (loaded - started) * 1000,
            "launcher_ms": (usable - started) * 1000,
            "requests": len(requests),
            "mib": sizes / 2**20,
        }
    finally:
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--mode", choices=("header", "uri"), default="header")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the whole run")
    args = parser.parse_args()
    mode = HEADER if args.mode == "header" else URI
    deadline = time.monotonic() + args.timeout
    work = Path(tempfile.mkdtemp(prefix="lab-load-"))
    with open(work / "jupyter.log", "wb") as jlog, open(work / "ingress.log", "wb") as ilog:
        jupyter = Jupyter(work / "jupyter", mode, jlog)
        ingress = Ingress(work, mode, ilog)
        try:
            jupyter.wait_ready()
            ingress.wait_ready()
            urls = {
                "direct": f"{jupyter.direct_url}lab?token={TOKEN}",
                "ingress": f"{mode.url(ingress.port, jupyter.port)}lab?token={TOKEN}",
            }
            results: dict[str, list[dict[str, float]]] = {"direct": [], "ingress": []}
            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                try:
                    for url in urls.values():
                        load_once(browser, url, 120)  # warm-up, not counted
                    for n in range(args.loads):
                        for name, url in urls.items():
                            if time.monotonic() > deadline:
                                raise SystemExit("timed out")
                            result = load_once(browser, url, 120)
                            results[name].append(result)
                            print(
                                f"load {n + 1} {name:8} load={result['load_ms']:7.0f} ms "
                                f"launcher={result['launcher_ms']:7.0f} ms "
                                f"requests={result['requests']:.0f} body={result['mib']:.2f} MiB",
                                flush=True,
                            )
                finally:
                    browser.close()
        finally:
            ingress.stop()
            jupyter.stop()
    print()
    print(f"| /lab cold load ({mode.name} mode, {args.loads} loads each) | load event, median | launcher shown, median | launcher shown, all |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        load = statistics.median(r["load_ms"] for r in runs)
        shown = [r["launcher_ms"] for r in runs]
        print(
            f"| {name} | {load:.0f} ms | {statistics.median(shown):.0f} ms | "
            + ", ".join(f"{v:.0f}" for v in shown)
            + " ms |"
        )


if __name__ == "__main__":
    main()
