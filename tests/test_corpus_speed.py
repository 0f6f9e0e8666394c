"""retrieve-corpus's pipeline: the same bytes as a plain batch loop, errors and interruptions,
resuming, the summary's rates and the corpus_speed benchmark's dry run."""
from __future__ import annotations

import json
import runpy
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal.search import retrieve_corpus
from xmodal.search.corpus import CorpusPipeline
from xmodal.search.query import encode_text_queries

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a red green blue cat dog star moon heart small large happy near the of with".split()


@pytest.fixture(scope="module")
def model_and_index(tmp_path_factory):
    """An untrained BiGRU dual encoder (its own word tokenizer) and an index of 300 random vectors."""
    from xmodal.config import load_config
    from xmodal.index import Index
    from xmodal.models import create_model
    from xmodal.models.text.bigru import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    tok = json.dumps(train_tokenizer([" ".join(WORDS)]))
    cfg = root / "m.yaml"
    cfg.write_text("model:\n  type: dual_encoder\n  embed_dim: 24\n"
                   "  image: {name: features, args: {in_dim: 8, out_dim: 16, pooling: mean}, frozen: false}\n"
                   f"  text: {{name: bigru, args: {{word_dim: 8, out_dim: 16, tokenizer_json: {tok}}}, frozen: false}}\n")
    torch.manual_seed(0)
    model = create_model(load_config(cfg).model).eval()
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((300, 24)).astype(np.float32)
    index = Index.create(root / "r.idx", 24)
    index.add(vecs / np.linalg.norm(vecs, axis=1, keepdims=True), [f"img/{i}" for i in range(300)])
    index.commit()
    return model, Index.open(root / "r.idx")


def _corpus(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        lines.append("" if i % 17 == 5 else " ".join(rng.choice(WORDS, int(rng.integers(1, 12)))))
    lines[3] = "a caf\u00e9 \u2028 line sep \u00e9t\u00e9"  # non-ASCII and a JSON-raw line break
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _plain_loop(index, model, corpus: Path, k: int, batch_size: int) -> bytes:
    """What retrieve-corpus wrote before the pipeline: per batch, encode, search, one JSON line each."""
    breaks = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
    sents = [(n, line.strip()) for n, line in enumerate(corpus.read_text(encoding="utf-8").split("\n")[:-1], 1)
             if line.strip()]
    out = []
    for i in range(0, len(sents), batch_size):
        batch = sents[i:i + batch_size]
        scores, rows = index.search(encode_text_queries(model, [t for _, t in batch]), k)
        for (n, t), sc, ids in zip(batch, scores.tolist(), index.ids_of(rows)):
            out.append(json.dumps({"line": n, "text": t, "ids": ids, "scores": [round(s, 6) for s in sc]},
                                  ensure_ascii=False).translate(breaks))
    return ("\n".join(out) + "\n").encode("utf-8")


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
def test_pipeline_writes_the_plain_loops_bytes(model_and_index, tmp_path, batch_size):
    model, index = model_and_index
    corpus = _corpus(tmp_path / "c.txt", 150)
    out = tmp_path / "v.jsonl"
    summary = retrieve_corpus(index, model, corpus, out, k=4, batch_size=batch_size)
    assert out.read_bytes() == _plain_loop(index, model, corpus, 4, batch_size)
    assert summary["sentences"] == 150 - 9 and summary["sentences_per_s"] > 0
    assert set(summary["stage_seconds"]) == {"read", "encode", "search", "format", "write"}
    assert summary["encoder_sentences_per_s"] > 0
    assert not (tmp_path / "v.jsonl.progress.json").exists()


def test_encode_error_mid_corpus_commits_only_written_batches_then_resumes(model_and_index, tmp_path):
    model, index = model_and_index
    corpus = _corpus(tmp_path / "c.txt", 120)
    out = tmp_path / "v.jsonl"

    class Failing:  # the real model, failing on its 4th batch (a model built in code: no Run needed)
        calls = 0

        def encode_text(self, texts):
            self.calls += 1
            if self.calls == 4:
                raise RuntimeError("encoder failed")
            return model.encode_text(texts)

    with pytest.raises(RuntimeError, match="encoder failed"):
        retrieve_corpus(index, Failing(), corpus, out, k=3, batch_size=10)
    side = json.loads((tmp_path / "v.jsonl.progress.json").read_text())
    assert side["sentences"] == 30  # three batches written and committed, none beyond
    assert out.stat().st_size == side["output_bytes"]
    summary = retrieve_corpus(index, model, corpus, out, k=3, batch_size=10)
    assert summary["resumed_from_line"] == side["lines_consumed"] + 1
    assert out.read_bytes() == _plain_loop(index, model, corpus, 3, 10)


def _slow(f, delays):
    def g(*a):
        time.sleep(float(delays.pop(0)) if delays else 0.0)
        return f(*a)
    return g


def test_pipeline_keeps_order_under_uneven_stage_times():
    rng = np.random.default_rng(1)
    batches = [[(i, f"s{i}", i)] for i in range(1, 21)]
    feed = iter(batches)
    pipe = CorpusPipeline(lambda: next(feed, []), _slow(lambda texts: texts, list(rng.uniform(0, 0.01, 20))),
                          _slow(lambda q: (q, q), list(rng.uniform(0, 0.01, 20))),
                          lambda batch, scores, rows: (batch[0][0], scores))
    with pipe:
        got = [(batch[0][0], out) for batch, out in pipe]
    assert got == [(i, (i, [f"s{i}"])) for i in range(1, 21)]
    assert pipe.timings["encode_s"] > 0 and pipe.timings["search_s"] > 0


@pytest.mark.parametrize("stage", ["read", "encode", "search", "format"])
def test_a_stage_error_is_raised_in_the_caller(stage):
    def boom(*a):
        raise ValueError(f"{stage} broke")

    feed = iter([[(1, "a", 1)], [(2, "b", 2)]])
    fns = {"read": lambda: next(feed, []), "encode": lambda texts: texts, "search": lambda q: (q, q),
           "format": lambda b, s, r: b}
    fns[stage] = boom
    with pytest.raises(ValueError, match=f"{stage} broke"):
        with CorpusPipeline(fns["read"], fns["encode"], fns["search"], fns["format"]) as pipe:
            list(pipe)
    assert not [t for t in threading.enumerate() if t.name.startswith("xmodal-corpus")]


def test_leaving_early_stops_the_stages_and_reads_no_further():
    reads = []

    def read():
        reads.append(1)
        return [(len(reads), "x", 0)]  # an endless corpus

    with pytest.raises(KeyboardInterrupt):
        with CorpusPipeline(read, lambda t: t, lambda q: (q, q), lambda b, s, r: b, prefetch=1) as pipe:
            for i, _ in enumerate(pipe):
                if i == 2:
                    raise KeyboardInterrupt
    assert not [t for t in threading.enumerate() if t.name.startswith("xmodal-corpus")]
    n = len(reads)
    time.sleep(0.05)
    assert len(reads) == n and n <= 3 + 2 * 1 + 3  # consumed + queued + in flight, then nothing


def test_cli_prints_the_rate(model_and_index, tmp_path, capsys):
    """The printed summary names sentences/s; --json carries the stage times."""
    from xmodal.cli import main

    fx = _fixture_run(tmp_path)
    corpus = _corpus(tmp_path / "c.txt", 40)
    assert main(["retrieve-corpus", str(fx), str(corpus), "--out", str(tmp_path / "a.jsonl"), "--no-progress"]) == 0
    assert "sentences/s" in capsys.readouterr().out
    assert main(["retrieve-corpus", str(fx), str(corpus), "--out", str(tmp_path / "b.jsonl"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sentences_per_s"] > 0 and "encode" in summary["stage_seconds"]
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def _fixture_run(tmp_path: Path) -> Path:
    """A 3-step tiny precomp run and an index of its test images."""
    from xmodal.cli import main

    from train_fixtures import write_synthetic_precomp, write_tiny_config

    data = write_synthetic_precomp(tmp_path / "data")
    cfg = write_tiny_config(tmp_path / "tiny.yaml", data, steps=3)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert main(["index", str(run), "--data", "split:test", "--out", str(tmp_path / "t.idx"), "--no-progress"]) == 0
    return tmp_path / "t.idx"


def test_corpus_speed_benchmark_dry_run(tmp_path, monkeypatch, capsys):
    """The benchmark's --dry-run, run in this process (no second torch start-up)."""
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["corpus_speed.py", "--dry-run", "--json", str(out), "--workdir", str(tmp_path)])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(ROOT / "benchmarks" / "corpus_speed.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == res
    assert res["sentences"] == 300 and res["identical_outputs"] is True
    assert res["encoder"]["sentences_per_s"] > 0 and res["retrieve_corpus"]["sentences_per_s"] > 0
    assert res["ratio_corpus_over_encoder"] == pytest.approx(
        res["retrieve_corpus"]["sentences_per_s"] / res["encoder"]["sentences_per_s"], abs=1e-3)
