#!/usr/bin/env python
"""Regenerate the screenshots in docs/: the evaluation report and the search web page.

    python scripts/screenshots.py                      # quick demo into runs/demo_quick, then both shots
    python scripts/screenshots.py --out /tmp/demo_q    # reuse that folder's report.html and run/
    python scripts/screenshots.py --only report --out DIR --docs DIR/shots

1. ``report``: runs ``xmodal demo --quick --out OUT`` (which itself reuses a finished run there)
   unless ``OUT/report.html`` already exists and ``--out`` was given, then opens ``report.html`` in
   headless Chromium and writes ``DOCS/report.png``.
2. ``search``: builds ``OUT/search.idx`` from ``OUT/run`` (``xmodal index RUN --data split:test``)
   unless it exists, starts ``xmodal serve`` on 127.0.0.1 (a free port unless ``--port``), types
   ``--query`` into the page, waits until the results' images have loaded and writes
   ``DOCS/search_page.png``. The server is stopped afterwards, whatever happens.

Needs Playwright's Python package (no browser download: it drives the system Chromium,
``/usr/bin/chromium``; Debian: ``apt-get install -y chromium``) and, for the search part, the
serve extra (``pip install -e ".[serve]"``). Nothing is fetched from the network; the report
is a single self-contained file and the page is served from this machine.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "runs" / "demo_quick"
DEFAULT_DOCS = REPO / "docs"
DEFAULT_QUERY = "a red heart"
VIEWPORT = {"width": 1200, "height": 900}


class ScreenshotError(RuntimeError):
    """A step failed; the message says which and what to do."""


def find_chromium(explicit: str | None = None) -> str:
    """The Chromium binary: ``--chromium``, else ``chromium`` / ``chromium-browser`` on PATH, else
    ``/usr/bin/chromium``."""
    for cand in (explicit, shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return str(cand)
    raise ScreenshotError("no Chromium found (give --chromium PATH; Debian: apt-get install -y chromium)")


def _xmodal(*args: str, timeout: float) -> None:
    cmd = [sys.executable, "-m", "xmodal", *args]
    print("$ xmodal " + " ".join(args), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, timeout=timeout, stdout=sys.stderr)
    if proc.returncode != 0:
        raise ScreenshotError(f"xmodal {args[0]} failed with exit status {proc.returncode}")


def ensure_demo(out: Path, reuse: bool) -> Path:
    """``OUT/report.html``: reused as it is when ``reuse`` and present, else written by the quick demo."""
    report = out / "report.html"
    if reuse and report.is_file():
        print(f"reusing {report}", file=sys.stderr)
        return report
    _xmodal("demo", "--quick", "--out", str(out), "--no-progress", timeout=3600)
    if not report.is_file():
        raise ScreenshotError(f"the demo wrote no {report}")
    return report


def shrink_png(png: Path, colors: int) -> None:
    """Re-save ``png`` with a ``colors``-colour palette (0: leave it as Chromium wrote it).

    A report shot is flat colours, text and small emoji pictures: 256 colours keep it readable at
    about a third of the bytes, which matters for files committed to docs/."""
    if not colors:
        return
    from PIL import Image

    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(png, optimize=True)


def _launch(playwright, chromium: str):
    return playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])


def screenshot_report(report: Path, png: Path, chromium: str, max_height: int = 4000, colors: int = 0) -> Path:
    """A full-page shot of ``report`` (cut at ``max_height`` CSS pixels: the top holds the summary,
    metrics and curves; the examples go on for pages). The page must load with no script error and
    request nothing but its own file."""
    from playwright.sync_api import sync_playwright

    report = Path(report).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = _launch(p, chromium)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            external: list[str] = []
            page.on("request", lambda r: external.append(r.url)
                    if not r.url.startswith(("file:", "data:")) else None)
            page.goto(report.as_uri(), wait_until="load")
            page.wait_for_function("[...document.images].every(i => i.complete)")
            height = min(int(page.evaluate("document.documentElement.scrollHeight")), max_height)
            page.screenshot(path=str(png), full_page=True,
                            clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height})
        finally:
            browser.close()
    if errors:
        raise ScreenshotError(f"{report}: script errors in the page: {errors}")
    if external:
        raise ScreenshotError(f"{report}: the page requested outside resources: {external[:3]}")
    shrink_png(png, colors)
    print(f"wrote {png}", file=sys.stderr)
    return png


def ensure_index(out: Path) -> Path:
    """``OUT/search.idx`` of the test split, built again when the run's weights are newer."""
    index, run = out / "search.idx", out / "run"
    if not run.is_dir():
        raise ScreenshotError(f"{out}: no run/ folder to build an index from (run the demo there first)")
    manifest, weights = index / "manifest.json", run / "best" / "model.safetensors"
    if manifest.is_file() and (not weights.is_file() or manifest.stat().st_mtime >= weights.stat().st_mtime):
        print(f"reusing index {index}", file=sys.stderr)
        return index
    if index.exists():
        shutil.rmtree(index)  # built with other weights: xmodal serve would refuse it
    _xmodal("index", str(run), "--data", "split:test", "--out", str(index), "--no-progress", timeout=1800)
    return index


def _start_server(index: Path, port: int) -> tuple[subprocess.Popen, str]:
    """``xmodal serve INDEX`` in the background; returns it with its URL once it answers."""
    cmd = [sys.executable, "-m", "xmodal", "serve", str(index), "--host", "127.0.0.1", "--port", str(port)]
    print("$ xmodal " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # "serving ... on http://127.0.0.1:PORT/ ..." once it listens
    match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
    if not match:
        _stop(proc)
        raise ScreenshotError(f"xmodal serve did not start: {line.strip() or 'no output'}")
    url = match.group(1)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "api/health", timeout=5):
                return proc, url
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                raise ScreenshotError(f"xmodal serve at {url} did not answer") from None
            time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def screenshot_search(index: Path, png: Path, chromium: str, query: str, port: int = 0, colors: int = 0) -> Path:
    """Serve ``index``, type ``query`` into the page, wait for its images, screenshot the page."""
    from playwright.sync_api import sync_playwright

    png.parent.mkdir(parents=True, exist_ok=True)
    proc, url = _start_server(index, port)
    try:
        with sync_playwright() as p:
            browser = _launch(p, chromium)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(url, wait_until="load")
                page.fill("#q", query)
                page.press("#q", "Enter")
                # results are images in #results; wait until they are there and decoded
                page.wait_for_function(
                    "(() => { const im = [...document.querySelectorAll('#results img')];"
                    " return im.length > 0 && im.every(i => i.complete && i.naturalWidth > 0); })()",
                    timeout=60_000)
                page.wait_for_timeout(300)  # let layout settle (fonts, late thumbnails)
                page.screenshot(path=str(png), full_page=True)
            finally:
                browser.close()
    finally:
        _stop(proc)
    shrink_png(png, colors)
    print(f"wrote {png}", file=sys.stderr)
    return png


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", type=Path, default=None,
                   help=f"demo output folder; reused when it holds report.html (default: run the quick "
                        f"demo into {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="where the PNGs go (default: docs/)")
    p.add_argument("--only", choices=("report", "search"), default=None, help="take one of the two shots")
    p.add_argument("--query", default=DEFAULT_QUERY, help=f"text typed into the page (default {DEFAULT_QUERY!r})")
    p.add_argument("--port", type=int, default=0, help="port for xmodal serve (default: a free one)")
    p.add_argument("--chromium", default=None, help="Chromium binary (default: chromium on PATH, /usr/bin/chromium)")
    p.add_argument("--max-height", type=int, default=4000, help="cut the report shot at this height (px)")
    p.add_argument("--colors", type=int, default=256,
                   help="palette size of the written PNGs (default 256, about a third of the bytes; 0: as shot)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        chromium = find_chromium(args.chromium)
        out = (args.out or DEFAULT_OUT).resolve()
        if args.only in (None, "report"):
            report = ensure_demo(out, reuse=args.out is not None)
            screenshot_report(report, args.docs / "report.png", chromium, args.max_height, args.colors)
        if args.only in (None, "search"):
            if args.only == "search":
                ensure_demo(out, reuse=True)
            screenshot_search(ensure_index(out), args.docs / "search_page.png", chromium, args.query, args.port,
                              args.colors)
    except ScreenshotError as exc:
        print(f"screenshots: error: {exc}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
