"""``xmodal inspect`` on WebDataset shards: streamed report vs reading every split.

Writes synthetic COCO-shaped shards (``--images`` samples, default 50,000, in shards of
``--shard-size``; each sample a small JPEG and a ``.json`` with five captions in two languages,
as ``xmodal export`` writes them; every 50th text also matches the next image) into a
temporary folder, indexes them once (the ``.idx`` sidecars any first read writes) and reads
them once (so both children find them in the page cache), then runs in separate processes:

* ``stream`` - :func:`xmodal.data.inspect.inspect_dataset` (one sample at a time reduced to
  64-bit keys; what ``xmodal inspect --format webdataset`` runs);
* ``reader`` - the same report the non-streaming way: ``load_dataset("webdataset", ...)``
  then :func:`xmodal.data.inspect.dataset_stats` (what inspect did before).

Each child's wall time and peak RSS (``wait4``'s ``ru_maxrss``) are measured by the parent and
printed with the ratios reader / stream from the same run; both reports are checked equal.

    python benchmarks/inspect_webdataset.py                # 50,000 images, 250,000 captions
    python benchmarks/inspect_webdataset.py --dry-run      # 600 images, seconds (in the test suite)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("a man woman dog cat sitting standing on the with of in near red blue green large small "
         "table street park beach kitchen bus train plate pizza bicycle horse sky water tree").split()


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, images: int, shard_size: int, seed: int = 0) -> int:
    """The synthetic shards, written shard by shard; returns the number of shards."""
    rng = np.random.default_rng(seed)
    img, v = _jpeg(), len(WORDS)
    folder.mkdir(parents=True)
    shards = 0
    for lo in range(0, images, shard_size):
        with tarfile.open(folder / f"shard-{shards:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(lo, min(lo + shard_size, images)):
                texts = []
                for j in range(5):
                    words = rng.integers(0, v, 10)
                    t = {"id": f"{i}-{j}", "caption": " ".join(WORDS[w] for w in words), "lang": "en" if j else "es"}
                    if (5 * i + j) % 50 == 0 and i + 1 < images:
                        t["also"] = [f"im{i + 1}"]
                    texts.append(t)
                key = f"{i:09d}"
                _add(tf, f"{key}.jpg", img)
                _add(tf, f"{key}.json", json.dumps({"image_id": f"im{i}", "texts": texts}).encode())
        shards += 1
    return shards


def child(mode: str, path: str, out: str) -> None:
    from xmodal.data.base import load_dataset
    from xmodal.data.inspect import dataset_stats, inspect_dataset

    if mode == "stream":
        report = inspect_dataset("webdataset", path, progress=False)["splits"]
    else:
        report = {"all": dataset_stats(load_dataset("webdataset", path, "all"))}
    Path(out).write_text(json.dumps(report))


def measure(mode: str, path: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, str(path), str(out)])
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} child failed with status {os.waitstatus_to_exitcode(status)}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--dry-run", action="store_true", help="600 images in shards of 100")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    images, shard_size = (600, 100) if args.dry_run else (args.images, args.shard_size)
    with tempfile.TemporaryDirectory(prefix="xmodal-inspect-wds-bench-") as tmp:
        folder = Path(tmp) / "wds"
        t0 = time.perf_counter()
        shards = write_shards(folder, images, shard_size)
        mb = sum(p.stat().st_size for p in folder.glob("*.tar")) / 1e6
        from xmodal.data.webdataset import shard_index

        for p in sorted(folder.glob("*.tar")):
            shard_index(p)
            with open(p, "rb") as f:  # into the page cache, so neither child pays for cold reads
                while f.read(1 << 24):
                    pass
        print(f"wrote and indexed {images:,} images in {shards} shards ({mb:.0f} MB) in {time.perf_counter() - t0:.1f}s")
        results: dict = {"images": images, "texts": 5 * images, "shards": shards, "tar_mb": round(mb, 1)}
        for mode in ("stream", "reader"):
            results[mode] = measure(mode, folder, Path(tmp) / f"{mode}.json")
            print(f"{mode}: {results[mode]}")
        stream, reader = (json.loads((Path(tmp) / f"{m}.json").read_text()) for m in ("stream", "reader"))
        results["same_report"] = stream == reader
        results["ratio_reader_over_stream"] = {
            k: round(results["reader"][k] / max(results["stream"][k], 1e-9), 2) for k in ("wall_s", "peak_rss_mb")}
        print(f"reader / stream: {results['ratio_reader_over_stream']}; same report: {results['same_report']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not results["same_report"]:
        print("the two reports differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
