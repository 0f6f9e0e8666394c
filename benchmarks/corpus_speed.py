"""retrieve-corpus at encoder speed: sentences/s of the whole job against the text encoder alone.

    python benchmarks/corpus_speed.py                           # MiniLM text tower, 4,000 sentences, 50,000 images
    python benchmarks/corpus_speed.py --text-tower bigru --sentences 40000
    python benchmarks/corpus_speed.py --dry-run                 # tiny (the test suite)

The model is a dual encoder built from its config, untrained (speed does not depend on the
weights): frozen MiniLM (``--text-tower minilm``, the Vokenization text tower) or a BiGRU with a
word tokenizer trained on the corpus, and a 256-d linear text head. The index is ``--images``
random unit vectors of that dimension (exact backend). The corpus is ``--sentences`` synthetic
sentences of 6 to 20 words.

In one process, alternating (each measured twice, the faster run kept):

* **encoder**: ``encode_text`` over the corpus sentences in batches of ``--batch-size``, nothing
  else (no reading, search or output): the text encoder's own batch throughput;
* **retrieve-corpus**: :func:`xmodal.search.retrieve_corpus` on the same sentences and batch
  size: reading, encoding, top-``k`` search, JSON lines, per-batch fsync and progress commit.

Reports both rates and their ratio (goal >= 0.8), with the pipeline's busy seconds per stage.
Every retrieve-corpus run must write the same bytes (checked).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("a the red green blue yellow small large happy sad cat dog face heart star moon sun tree house car "
         "flag of with and on in near under over smiling crying running jumping fire water ice cloud rain snow "
         "apple banana pumpkin lantern ghost robot rocket music book phone clock key lock bell gift cake").split()
CONFIG = """
name: corpus-speed
model:
  type: dual_encoder
  embed_dim: 256
  image: {{name: features, args: {{in_dim: 16, out_dim: 32, pooling: mean}}, frozen: false}}
  text: {text}
  image_head: {{input: pooled, proj: linear}}
  text_head: {{input: pooled, proj: linear}}
"""


def write_corpus(path: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, int(rng.integers(6, 21)))) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def build_model(text_tower: str, sentences: list[str]):
    import torch

    from xmodal.config import load_config
    from xmodal.models import create_model

    if text_tower == "minilm":
        text = "{name: hf, args: {pooling: mean}, frozen: true}"
    else:
        from xmodal.models.text.bigru import train_tokenizer

        tok = json.dumps(train_tokenizer(sentences[:2000]))  # a JSON string inside YAML flow style
        text = f"{{name: bigru, args: {{word_dim: 64, out_dim: 256, tokenizer_json: {tok}}}, frozen: false}}"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(CONFIG.format(text=text))
    try:
        cfg = load_config(fh.name, [])
    finally:
        os.unlink(fh.name)
    torch.manual_seed(0)
    return create_model(cfg.model).eval()


def build_index(path: Path, dim: int, n: int, seed: int = 0):
    from xmodal.index import Index

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = Index.create(path, dim)
    index.add(vectors, [f"img/{i}" for i in range(n)])
    index.commit()
    return Index.open(path)


def encoder_rate(model, sentences: list[str], batch_size: int) -> dict:
    """The text encoder alone over the sentences, batch by batch (no I/O, no search)."""
    from xmodal.search.query import encode_text_queries

    t0 = time.perf_counter()
    for i in range(0, len(sentences), batch_size):
        encode_text_queries(model, sentences[i:i + batch_size])
    s = time.perf_counter() - t0
    return {"seconds": round(s, 3), "sentences_per_s": round(len(sentences) / s, 1)}


def corpus_rate(index, model, corpus: Path, out: Path, k: int, batch_size: int) -> dict:
    from xmodal.search import retrieve_corpus

    summary = retrieve_corpus(index, model, corpus, out, k=k, batch_size=batch_size, overwrite=True)
    summary["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    return summary


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text-tower", choices=("minilm", "bigru"), default="minilm")
    p.add_argument("--sentences", type=int, default=4000)
    p.add_argument("--images", type=int, default=50000, help="index size (random unit vectors)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--dry-run", action="store_true", help="tiny: BiGRU, 300 sentences, 500 images, batch 64")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.dry_run:
        args.text_tower, args.sentences, args.images, args.batch_size = "bigru", 300, 500, 64
    return args


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        sentences = write_corpus(tmp / "corpus.txt", args.sentences)
        model = build_model(args.text_tower, sentences)
        index = build_index(tmp / "random.idx", 256, args.images)
        encoder_rate(model, sentences[: args.batch_size], args.batch_size)  # warm-up
        setup_s = time.perf_counter() - t0
        enc, runs = [], []
        for _ in range(2):
            enc.append(encoder_rate(model, sentences, args.batch_size))
            runs.append(corpus_rate(index, model, tmp / "corpus.txt", tmp / "vokens.jsonl", args.k, args.batch_size))
    ref = max(enc, key=lambda r: r["sentences_per_s"])
    best = max(runs, key=lambda r: r["sentences_per_s"])
    same = len({r["sha256"] for r in runs}) == 1
    ratio = round(best["sentences_per_s"] / ref["sentences_per_s"], 3)
    out = {"text_tower": args.text_tower, "sentences": args.sentences, "images": args.images,
           "batch_size": args.batch_size, "k": args.k, "setup_s": round(setup_s, 1),
           "encoder": ref, "encoder_runs_per_s": [r["sentences_per_s"] for r in enc],
           "retrieve_corpus": {key: best[key] for key in ("seconds", "sentences_per_s", "stage_seconds",
                                                          "encoder_sentences_per_s", "output_bytes")},
           "retrieve_corpus_runs_per_s": [r["sentences_per_s"] for r in runs],
           "ratio_corpus_over_encoder": ratio, "identical_outputs": same,
           "goals": {"ratio_ge_0.8": ratio >= 0.8},
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "threads": args.threads,
                       "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if not same:
        sys.exit("retrieve-corpus runs wrote different bytes")


if __name__ == "__main__":
    main()
