"""Render OUT/report/report.html in headless Chromium (Debian's `chromium` package) and save
a full-page screenshot, to look at the page as a person would.

    .venv/bin/python scripts/screenshot_report.py OUT/report/report.html --output shot.png

Chromium runs with no network access needed: the page is self-contained (plots embedded).
Install it with `apt-get install chromium` (it is not part of `make install`).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=4200)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: chromium not found (apt-get install chromium)", file=sys.stderr)
        return 1
    if not args.page.is_file():
        print(f"error: {args.page} does not exist", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="ptqd-chromium-") as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={args.width},{args.height}",
               f"--screenshot={args.output.absolute()}", args.page.absolute().as_uri()]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not args.output.is_file():
        print(f"error: chromium failed ({result.returncode}): {result.stderr.strip()[-400:]}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes) from {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
