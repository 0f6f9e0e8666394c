"""How long ``xmodal demo`` takes: a first run on an empty cache against a second, cached run.

    python benchmarks/demo_time.py               # xmodal demo and xmodal demo --quick
    python benchmarks/demo_time.py --only quick  # just demo --quick
    python benchmarks/demo_time.py --dry-run     # the same plumbing on `xmodal demo --help` (tests)

Each mode runs twice in a subprocess with its own fresh ``XMODAL_CACHE`` (a temporary folder):
the first run extracts and caches every frozen-tower output, the second reads them. Printed per
mode: both wall times, their ratio (first / cached: what the one-off extraction costs), and the
extraction rate that the feature cache's manifests record (images/s). These are the README's
"How long it takes" figures; the machine's load is printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"full": [], "quick": ["--quick"]}


def run_once(args: list[str], cache: Path, out: Path) -> float:
    """Seconds of one ``xmodal demo ARGS`` run with ``XMODAL_CACHE=cache``; a failure is fatal."""
    env = {**os.environ, "XMODAL_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "xmodal", "demo", *args, "--out", str(out), "--no-progress"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def extraction_rate(cache: Path) -> float | None:
    """Images/s over every feature entry the run extracted (from the cache's manifests)."""
    images = seconds = 0.0
    for manifest in cache.glob("features/*/manifest.json"):
        info = json.loads(manifest.read_text())
        if info.get("elapsed_s"):
            images, seconds = images + info.get("num_images", 0), seconds + info["elapsed_s"]
    return round(images / seconds, 1) if seconds else None


def measure(mode: str, extra: list[str], work: Path) -> dict:
    cache = work / f"cache-{mode}"
    first = run_once(extra, cache, work / f"out-{mode}-1")
    cached = run_once(extra, cache, work / f"out-{mode}-2")
    return {"mode": mode, "first_s": round(first, 1), "cached_s": round(cached, 1),
            "first_over_cached": round(first / cached, 2), "extraction_images_per_s": extraction_rate(cache)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=sorted(MODES), default=None)
    p.add_argument("--dry-run", action="store_true", help="time `xmodal demo --help` instead (seconds)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    modes = {"help": ["--help"]} if args.dry_run else (
        {args.only: MODES[args.only]} if args.only else MODES)
    with tempfile.TemporaryDirectory(prefix="xmodal_demo_time_") as tmp:
        results = [measure(mode, extra, Path(tmp)) for mode, extra in modes.items()]
    report = {"results": results, "load_avg": list(os.getloadavg()), "cpus": os.cpu_count()}
    for r in results:
        print(f"xmodal demo {r['mode']}: first run {r['first_s']} s, cached {r['cached_s']} s "
              f"(first / cached {r['first_over_cached']}x), extraction {r['extraction_images_per_s']} images/s")
    print(f"load average {report['load_avg'][0]:.2f} on {report['cpus']} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
