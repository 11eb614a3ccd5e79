"""Render a report in headless Chromium and keep the screenshot (issue 6).

    python bench/render.py runs/demo/report.html --png bench/results/report.png

Needs Debian's `chromium` (`apt-get install chromium`). Chromium is started the way this
machine's closed network needs (no background networking, fresh profile). Prints the page's
size, the share of non-white pixels and how many images loaded, so a blank or broken page
shows up as a number; then look at the PNG.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def render(page: Path, png: Path, width: int, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}",
                        f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
                        page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page", type=Path)
    p.add_argument("--png", type=Path, default=Path("bench/results/report.png"))
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=4000)
    args = p.parse_args()
    html = args.page.read_text()
    inline = len(re.findall(r'<img src="data:image/png;base64,', html))
    args.png.parent.mkdir(parents=True, exist_ok=True)
    render(args.page, args.png, args.width, args.height)
    pixels = mpimg.imread(args.png)[..., :3]
    inked = float(np.mean(pixels.min(axis=-1) < 0.95))
    rows_inked = np.flatnonzero((pixels.min(axis=-1) < 0.95).any(axis=1))
    print(f"{args.page}: {len(html) / 1e3:.0f} kB, {inline} inline PNG plots; "
          f"screenshot {pixels.shape[1]}x{pixels.shape[0]} -> {args.png}, "
          f"{inked:.1%} of pixels inked, content down to row "
          f"{rows_inked.max() if len(rows_inked) else 0}")


if __name__ == "__main__":
    main()
