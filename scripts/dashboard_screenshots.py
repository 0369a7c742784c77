"""Takes the README's dashboard screenshots (docs/screenshots/) from a running control plane.

    python scripts/dashboard_screenshots.py http://127.0.0.1:8080 TOKEN JOB_NAME

Uses Debian's headless Chromium through Playwright, like the browser tests."""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

OUT = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]


def main(base: str, token: str, job: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(base_url=base, viewport={"width": 1280, "height": 520})
        page.goto("/login")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_selector("#jobs tbody tr")
        page.screenshot(path=OUT / "jobs.png")
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(f"/jobs/{job}")
        page.wait_for_function("() => { const c = document.getElementById('chart-loss'); "
                               "return c.data && c.data.length && c.data[0].x.length > 0; }")
        page.locator("#ranks .show-log").first.click()
        page.wait_for_timeout(2000)
        page.screenshot(path=OUT / "job.png", full_page=True)
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
