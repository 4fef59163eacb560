"""Regenerate docs/screenshot.png: the demo in compare mode, served by a real rtws server.

    .venv/bin/python web/screenshot.py [--model PATH] [--out docs/screenshot.png]

Uses the bundled model by default and Debian's Chromium through Playwright
(pip install playwright; apt-get install chromium). Runs entirely on 127.0.0.1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from rtws.config import ServerConfig
from rtws.server import run_in_thread, stop_thread

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=800)
    args = ap.parse_args()

    server, thread = run_in_thread(ServerConfig(port=0, model=args.model, log_level="WARNING"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height}, device_scale_factor=1)
            page.goto(f"http://127.0.0.1:{server.port}/")
            expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=60_000)
            page.fill("#max-tokens", "120")

            page.fill("#prompt", "O, wilt thou leave me so unsatisfied?")
            page.press("#prompt", "Enter")
            expect(page.locator(".reply").nth(0)).to_have_attribute("data-state", "done", timeout=60_000)

            page.check("#compare")
            page.fill("#prompt", "The exchange of thy love's faithful vow for mine.")
            page.press("#prompt", "Enter")
            for i in (1, 2, 3):
                expect(page.locator(".reply").nth(i)).to_have_attribute("data-state", "done", timeout=60_000)
            page.locator("#prompt").blur()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        stop_thread(server, thread)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
