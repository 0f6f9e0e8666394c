"""``xmodal inspect`` on a FooDI-ML-sized CSV: streamed report vs reading every split.

Writes a synthetic CSV shaped like the released ``glovo-foodi-ml-dataset.csv`` (9 columns,
``--rows`` rows, default 2.8M; about 1.5M distinct ``s3_path`` images at full size, repeated
products, 80/10/10 subsets) into a temporary folder, then runs in separate processes:

* ``stream`` - :func:`xmodal.data.inspect.inspect_dataset` (blocks of the CSV reduced to
  64-bit keys; what ``xmodal inspect --format foodiml`` runs);
* ``reader`` - the same report the non-streaming way: ``load_dataset("foodiml", ...)`` per
  split, then :func:`xmodal.data.inspect.dataset_stats` (what inspect does for other formats).

Each child's wall time and peak RSS (``wait4``'s ``ru_maxrss``) are measured by the parent and
printed with the ratios reader / stream from the same run; both reports are checked equal.

    python benchmarks/inspect_foodiml.py                 # 2.8M rows (a few minutes)
    python benchmarks/inspect_foodiml.py --dry-run       # 3,000 rows, seconds (in the test suite)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("pollo queso tomate pan salsa patatas pizza burger cafe leche zumo agua ensalada arroz "
         "pasta carne pescado chocolate helado tarta fresa naranja limon picante grande pequeno "
         "menu doble vegano casero clasico especial").split()
SECTIONS = ("Bebidas", "Principales", "Entrantes", "Postres", "Cafes", "Menus", "Ofertas", "Salsas")
COLUMNS = ["country_code", "city_code", "store_name", "product_name", "collection_section",
           "product_description", "subset", "HIER", "s3_path"]


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    """The synthetic catalogue, written in blocks (never held whole)."""
    rng = np.random.default_rng(seed)
    products, images = max(1, rows * 2 // 3), max(1, rows * 5 // 7)  # ~1.5M distinct paths of 2.0M at 2.8M rows
    v = len(WORDS)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for start in range(0, rows, 100_000):
            m = min(100_000, rows - start)
            sub = rng.choice(np.array(["train", "val", "test"]), size=m, p=[0.8, 0.1, 0.1])
            prod = rng.integers(0, products, m)
            img = rng.integers(0, images, m)
            country = rng.choice(np.array(["ES", "IT", "PT", "AR", "MA"]), size=m)
            for k in range(m):
                p = int(prod[k])
                name = f"{WORDS[p % v]} {WORDS[(p // v) % v]} {p % 997}"
                desc = " ".join(WORDS[(p * 7 + j * 13) % v] for j in range(p % 12))
                w.writerow([country[k], "BCN", f"store {p % 5000}", name, SECTIONS[p % len(SECTIONS)], desc,
                            sub[k], "False", f"dataset/{country[k]}/{int(img[k]):08d}.png"])


def child(mode: str, path: str, out: str) -> None:
    from xmodal.data.base import load_dataset
    from xmodal.data.inspect import dataset_stats, inspect_dataset

    if mode == "stream":
        report = inspect_dataset("foodiml", path, progress=False)["splits"]
    else:
        report = {s: dataset_stats(load_dataset("foodiml", path, s)) for s in ("test", "train", "val")}
    Path(out).write_text(json.dumps(report, sort_keys=True))


def measure(mode: str, path: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, str(path), str(out)])
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} child failed with status {os.waitstatus_to_exitcode(status)}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def comparable(report: dict) -> dict:
    """The keys both paths produce (the streamed report adds image_files, countries, ...)."""
    keys = ("images", "texts", "positive_pairs", "captions_per_image", "positives_per_text", "missing_files",
            "duplicates")
    return {s: {k: r[k] for k in keys} for s, r in report.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_800_000)
    ap.add_argument("--dry-run", action="store_true", help="3,000 rows")
    ap.add_argument("--skip-reader", action="store_true", help="only the streamed report")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    rows = 3000 if args.dry_run else args.rows
    with tempfile.TemporaryDirectory(prefix="xmodal-inspect-bench-") as tmp:
        csv_path = Path(tmp) / "glovo-foodi-ml-dataset.csv"
        t0 = time.perf_counter()
        write_csv(csv_path, rows)
        print(f"wrote {rows:,} rows ({csv_path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f}s")
        results = {"rows": rows, "csv_mb": round(csv_path.stat().st_size / 1e6, 1)}
        results["stream"] = measure("stream", csv_path, Path(tmp) / "stream.json")
        print(f"stream: {results['stream']}")
        stream = json.loads((Path(tmp) / "stream.json").read_text())
        results["images"] = {s: r["images"] for s, r in stream.items()}
        results["image_files"] = sum(r["image_files"] for r in stream.values())
        if not args.skip_reader:
            results["reader"] = measure("reader", csv_path, Path(tmp) / "reader.json")
            print(f"reader: {results['reader']}")
            reader = json.loads((Path(tmp) / "reader.json").read_text())
            results["same_report"] = comparable(stream) == comparable(reader)
            results["ratio_reader_over_stream"] = {
                k: round(results["reader"][k] / max(results["stream"][k], 1e-9), 2) for k in ("wall_s", "peak_rss_mb")}
            print(f"reader / stream: {results['ratio_reader_over_stream']}; same report: {results['same_report']}")
            if not results["same_report"]:
                print("the two reports differ", file=sys.stderr)
                return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
