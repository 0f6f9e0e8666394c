"""The server's micro-batching: the batcher itself, batched answers against sequential ones, the
CLI options and the load benchmark's dry run."""
from __future__ import annotations

import json
import math
import runpy
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from xmodal.errors import ConfigError
from xmodal.serve.batching import MicroBatcher, check_batching

ROOT = Path(__file__).resolve().parents[1]


# -- the batcher, without a model -------------------------------------------------------------


def _gated(sizes: list[int], gate: threading.Event):
    """A ``run_batch`` that records batch sizes and holds its first batch until ``gate`` is set."""
    def run_batch(items):
        sizes.append(len(items))
        if len(sizes) == 1:
            assert gate.wait(10)
        if any(x == "bad" for x in items):
            raise ValueError("bad item")
        return [x * 2 for x in items]
    return run_batch


def _call(b: MicroBatcher, items, results: dict) -> list[threading.Thread]:
    """One thread per item calling ``b(item)``; ``results[item]`` = its result or its exception."""
    def one(x):
        try:
            results[x] = b(x)
        except Exception as e:  # noqa: BLE001 - checked by the test
            results[x] = e

    threads = [threading.Thread(target=one, args=(x,)) for x in items]
    for t in threads:
        t.start()
    return threads


def _wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def _leader_blocked(b: MicroBatcher, sizes: list[int], results: dict) -> list[threading.Thread]:
    """A first caller that leads a batch held by the gate; returns its thread."""
    threads = _call(b, [1], results)
    _wait_until(lambda: sizes)  # the leader is now inside its batch
    return threads


def test_concurrent_items_are_gathered_up_to_max_batch():
    sizes, gate, results = [], threading.Event(), {}
    b = MicroBatcher(_gated(sizes, gate), max_batch=4, max_wait_ms=0)
    threads = _leader_blocked(b, sizes, results)
    threads += _call(b, range(2, 12), results)  # 10 callers queue behind the leader
    _wait_until(lambda: b.stats()["waiting"] == 10)
    gate.set()
    for t in threads:
        t.join(10)
    assert results == {i: 2 * i for i in range(1, 12)}  # each caller got its own result
    assert sizes == [1, 4, 4, 2]  # a follower led each next batch, never above max_batch
    st = b.stats()
    assert st["batches"] == 4 and st["items"] == 11 and st["largest_batch"] == 4 and st["waiting"] == 0


def test_a_failing_item_fails_alone():
    sizes, gate, results = [], threading.Event(), {}
    b = MicroBatcher(_gated(sizes, gate), max_batch=8, max_wait_ms=0)
    threads = _leader_blocked(b, sizes, results)
    threads += _call(b, [3, "bad", 5], results)
    _wait_until(lambda: b.stats()["waiting"] == 3)
    gate.set()
    for t in threads:
        t.join(10)
    assert results[1] == 2 and results[3] == 6 and results[5] == 10
    assert isinstance(results["bad"], ValueError) and "bad item" in str(results["bad"])
    assert sizes[1] == 3 and sizes[2:] == [1, 1, 1]  # the failed batch, then each item alone


def test_a_lone_request_does_not_wait():
    calls = []
    b = MicroBatcher(lambda items: calls.append(len(items)) or list(items), max_batch=8, max_wait_ms=1000)
    t0 = time.perf_counter()
    assert [b(i) for i in range(3)] == [0, 1, 2]
    assert time.perf_counter() - t0 < 0.9  # a 1000 ms wait would have been spent at least once
    assert calls == [1, 1, 1]


def test_waits_for_more_under_load():
    sizes, gate, results = [], threading.Event(), {}
    b = MicroBatcher(_gated(sizes, gate), max_batch=16, max_wait_ms=400)
    threads = _leader_blocked(b, sizes, results)
    threads += _call(b, [2, 3], results)
    _wait_until(lambda: b.stats()["waiting"] == 2)
    gate.set()
    for t in threads:
        t.join(10)
    assert sizes == [1, 2]
    # the last batch held 2 items: the next leader waits (up to 400 ms) and gathers a straggler
    threads = _call(b, [4], results)
    time.sleep(0.03)
    threads += _call(b, [5], results)
    for t in threads:
        t.join(10)
    assert results[4] == 8 and results[5] == 10 and sizes == [1, 2, 2]


@pytest.mark.parametrize("max_batch,wait,match", [(0, 1, "max_batch=0"), (True, 1, "max_batch=True"),
                                                  (5000, 1, "max_batch=5000"), (4, -1, "batch_wait_ms=-1"),
                                                  (4, math.nan, "batch_wait_ms=nan"), (4, "2", "batch_wait_ms='2'")])
def test_bad_batching_settings_are_config_errors(max_batch, wait, match):
    with pytest.raises(ConfigError, match=match):
        check_batching(max_batch, wait)


# -- the service: batched answers equal sequential ones ---------------------------------------

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'xmodal[serve]')")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from test_serve import build_pixel_fixture

    return build_pixel_fixture(tmp_path_factory.mktemp("batching"))


@pytest.fixture(scope="module")
def services(fx):
    from xmodal.serve import load_service

    return load_service(fx["index"], fx["text_index"]), load_service(fx["index"], fx["text_index"], max_batch=1)


def _same(batched: list[dict], full: list[dict]) -> None:
    """``batched`` is the top of ``full`` (the sequential answer over the whole index): the same
    rows in the same order, scores equal up to float32 rounding (a batched GEMM sums in another
    order than a one-row one: about 1e-7 apart); rows whose scores tie (the fixture has duplicate
    captions) may swap."""
    assert len({r["id"] for r in batched}) == len(batched) <= len(full)
    score_of = {r["id"]: r["score"] for r in full}
    for a, b in zip(batched, full):
        assert abs(a["score"] - b["score"]) <= 3e-6, (a, b)
        if a["id"] != b["id"]:
            assert abs(score_of[a["id"]] - a["score"]) < 1e-5, (a, b)  # a tie, listed in another order


TEXTS = ["a red picture", "a blue picture", "green", "yellow red", "a picture of nothing at all", "blue blue blue",
         "unknownword", "a green picture"]


def test_batched_text_answers_equal_sequential_and_library(services, fx):
    from xmodal.index import Index
    from xmodal.index.build import load_index_run
    from xmodal.search import search_text

    batched, single = services
    ks = [1, 3, 8, 5, 2, 8, 4, 6]
    together = batched.text_batcher.run_batch(list(zip(TEXTS, ks)))  # one encode, one search
    alone = [single.search_text(t, 8) for t in TEXTS]
    index = Index.open(fx["index"])
    run = load_index_run(index)
    for t, k, a, b in zip(TEXTS, ks, together, alone):
        assert len(a) == k and [r["rank"] for r in a] == list(range(1, k + 1))
        _same(a, b)
        lib = search_text(index, run, t, 8)
        assert [r["id"] for r in b] == [r["id"] for r in lib] and [r["score"] for r in b] == [r["score"] for r in lib]


def test_batch_of_one_is_bit_identical_to_the_unbatched_path(services, fx):
    """``max_batch=1`` computes exactly what the service computed before batching existed."""
    import torch

    _, single = services
    for t in TEXTS:
        with torch.inference_mode():
            q = single.model.encode_text([t]).float().cpu().numpy()  # (1, D)
        scores, rows = single.index.search(q, 5)
        got = single.search_text(t, 5)
        assert [r["row"] for r in got] == rows[0].tolist()
        assert [r["score"] for r in got] == [round(float(s), 6) for s in scores[0]]


def test_concurrent_http_clients_get_their_own_answers(services, fx):
    from fastapi.testclient import TestClient

    from xmodal.serve import create_app, load_service

    service = load_service(fx["index"], max_batch=16, batch_wait_ms=5)
    _, single = services
    expected = {t: single.search_text(t, 8) for t in TEXTS}
    answers: dict[int, list] = {}
    with TestClient(create_app(service)) as client:
        def ask(i: int) -> None:
            answers[i] = [client.get("/api/search", params={"q": TEXTS[(i + j) % len(TEXTS)], "k": 4})
                          for j in range(6)]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        info = client.get("/api/info").json()
    for i, resps in answers.items():
        for j, resp in enumerate(resps):
            t = TEXTS[(i + j) % len(TEXTS)]
            assert resp.status_code == 200 and resp.json()["query"] == t
            _same(resp.json()["results"], expected[t])
    assert len(answers) == 8
    assert info["batching"]["text"]["items"] == 48 and info["batching"]["text"]["max_batch"] == 16


def test_batched_image_answers_equal_sequential(services, fx):
    from PIL import Image

    batched, single = services
    paths = sorted(fx["imgs"].rglob("*.png"))
    images = [Image.open(p).convert("RGB") for p in paths]
    ks = [3, 8, 1, 5, 2, 4, 6, 7]
    pixels = [batched.pixel_tower.preprocess(im) for im in images]
    together = batched.image_batcher.run_batch([(px, im, k) for px, im, k in zip(pixels, images, ks)])
    for im, k, got in zip(images, ks, together):
        want = single.search_image(im, 8)
        assert set(got) == {"images", "texts"} and len(got["images"]) == k and len(got["texts"]) == k
        _same(got["images"], want["images"])
        _same(got["texts"], want["texts"])


def test_cli_refuses_bad_batching_options(fx, capsys):
    from xmodal.cli import main

    for opts, match in ((["--max-batch", "0"], "--max-batch 0"), (["--batch-wait-ms", "-1"], "--batch-wait-ms -1"),
                        (["--batch-wait-ms", "nan"], "--batch-wait-ms nan"), (["--threads", "0"], "--threads 0")):
        assert main(["serve", str(fx["index"]), "--port", "0", *opts]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err


def test_serve_load_benchmark_dry_run(fx, tmp_path, monkeypatch, capsys):
    """The benchmark's --dry-run on the fixture's index, run in this process (the server is its
    subprocess, as always)."""
    out = tmp_path / "serve.json"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", ["serve_load.py", "--dry-run", "--index", str(fx["index"]), "--json", str(out),
                                      "--workdir", str(tmp_path)])
    runpy.run_path(str(ROOT / "benchmarks" / "serve_load.py"), run_name="__main__")
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == res
    batched = res["batched"]
    assert batched["concurrent"]["queries"] == 20 and batched["concurrent"]["errors"] == 0
    assert batched["sequential"]["queries"] == 5 and batched["sequential"]["errors"] == 0
    assert batched["server_batching"]["items"] == 10 + 5 + 20 + 5
    assert res["goals"]["zero_errors"] is True and "ratio_qps_concurrent_over_sequential" in batched
