"""Load the dashboard in headless Chromium (Debian's, driven by Playwright)
and watch it until the next migration it shows is completed; then save a
screenshot.  Run inside a rig host (the status listener is on its
127.0.0.1).  Prints LOADED once the page's event stream is open; writes
what it saw as JSON to RESULT.

    dashboard_shot.py URL SCREENSHOT RESULT [TIMEOUT]

TIMEOUT 0: only load it, see its stream open and its host named, and stop.
"""

import json
import shutil
import sys
import tempfile
import time

from playwright.sync_api import sync_playwright

url, shot, result = sys.argv[1:4]
timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 120
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

profile = tempfile.mkdtemp(prefix="migrate-chromium-")
seen = {"phases_seen": [], "loads": 0, "id": None, "final_status": None, "timeline": []}
try:
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path="/usr/bin/chromium", headless=True, args=ARGS,
            viewport={"width": 1200, "height": 720})
        page = ctx.pages[0] if ctx.pages else ctx.new_page()

        def loaded(_):
            seen["loads"] += 1
        page.on("load", loaded)
        page.goto(url)
        page.wait_for_selector("#conn.live", timeout=20000)
        before = page.text_content("#d-id") or ""
        print("LOADED", flush=True)
        page.wait_for_function("document.getElementById('host').textContent != ''",
                               timeout=10000)
        seen["host"] = page.text_content("#host")
        if timeout <= 0:
            seen["final_status"] = "live"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            mid = page.text_content("#d-id") or ""
            if mid and mid != before:
                seen["id"] = mid
                phase = page.text_content("#d-phase")
                if not seen["phases_seen"] or seen["phases_seen"][-1] != phase:
                    seen["phases_seen"].append(phase)
                status = page.text_content("#d-status")
                if status != "active":
                    seen["final_status"] = status
                    break
            time.sleep(0.05)
        page.wait_for_timeout(300 if timeout > 0 else 0)     # the last render
        seen["timeline"] = page.eval_on_selector_all(
            "#timeline-legend span", "els => els.map(e => e.textContent.split(' ')[0])")
        seen["rows"] = page.eval_on_selector_all("#migrations tbody tr", "els => els.length")
        page.screenshot(path=shot, full_page=True)
        ctx.close()
finally:
    shutil.rmtree(profile, ignore_errors=True)
with open(result, "w") as f:
    json.dump(seen, f)
sys.exit(0 if seen["final_status"] else 1)
