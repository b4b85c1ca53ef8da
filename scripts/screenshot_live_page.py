"""Take a PNG screenshot of the live soup page of a run folder, in headless Chromium driven by playwright.

    python scripts/screenshot_live_page.py RUN_DIR docs/live_page.png [--width 1280] [--url URL]

Without ``--url`` the page is served from the run folder by
``soup_ray.live_page.start_live_page`` (no Ray); with it, any running page
(the Serve ingress's ``/``) is captured. The browser is the system's
``chromium`` (or ``--browser PATH``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def find_browser(explicit: str | None = None) -> str | None:
    """The Chromium executable: ``explicit``, else the first of chromium / chromium-browser / google-chrome on PATH."""
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(url: str, out: Path, browser: str, width: int = 1280, height: int = 900) -> Path:
    """Load ``url``, wait for the soup card, save a full-page PNG to ``out``."""
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=browser, args=["--no-sandbox"])
        try:
            page = chromium.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
            page.goto(url, wait_until="load", timeout=30_000)
            page.wait_for_selector("#soup-version", timeout=30_000)
            page.screenshot(path=str(out), full_page=True)
        finally:
            chromium.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run folder (served here unless --url is given)")
    ap.add_argument("out", type=Path, help="the PNG to write")
    ap.add_argument("--url", help="capture this page instead of serving RUN_DIR")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--browser", help="path of a Chromium executable")
    args = ap.parse_args(argv)
    browser = find_browser(args.browser)
    if browser is None:
        print(
            "no Chromium found: install Debian's chromium (apt-get install chromium) or pass --browser", file=sys.stderr
        )
        return 2
    stop = None
    url = args.url
    if url is None:
        from soup_ray.live_page import start_live_page

        url, stop = start_live_page(args.run_dir)
    try:
        print(screenshot(url, args.out, browser, args.width, args.height))
    finally:
        if stop is not None:
            stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
