"""ADAPT on a FooDI-ML-format catalogue, end to end from the CLI: the released CSV with image
files and duplicates by caption and by image hash -> `xmodal train configs/adapt/foodiml.yaml`
-> `xmodal eval` exact, and two-stage behind a dual-encoder first stage (`--first-stage`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import write_foodiml_catalogue
from xmodal.cli import main
from xmodal.data import load_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "xmodal" / "configs"

# the paper config, shrunk to CPU size: 96 px images (3 x 3 grid), a small BiGRU and latent
SMALL = ["train.device=cpu", "train.steps=150", "train.batch_size=16", "train.eval_every=30",
         "train.log_every=10", "train.tensorboard=false", "model.image.args.image_size=96",
         "model.text.args.word_dim=32", "model.text.args.out_dim=64", "model.args.latent_dim=64",
         "optim.lr=0.003", "optim.schedule=constant"]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("foodiml")
    csv, rows = write_foodiml_catalogue(folder)
    return folder, csv, rows


def _metrics(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_fixture_has_the_duplicates_the_ground_truth_must_use(catalogue):
    folder, csv, rows = catalogue
    test = load_dataset("foodiml", csv, "test")
    assert test.num_texts == 21 and test.num_images == 21
    # store 0's caption matches its own picture, store 1's (same caption) and store 2's (same
    # picture by hash); store 1's matches its own and store 0's (same caption); store 2's its
    # own and store 0's (same hash): the original's rules, not their transitive closure
    assert [sorted(test.gt.images_of(t).tolist()) for t in range(3)] == [[0, 1, 2], [0, 1], [0, 2]]
    train = load_dataset("foodiml", csv, "train")
    assert train.num_texts == 30  # the exact duplicate row is dropped


@pytest.fixture(scope="module")
def runs(catalogue, tmp_path_factory):
    """ADAPT trained on the catalogue with the paper config (shrunk), and a dual encoder."""
    folder, csv, _ = catalogue
    tmp = tmp_path_factory.mktemp("foodiml_runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("XMODAL_CACHE", str(tmp / "cache"))
    data = [f"data.path={csv}", f"data.options.image_root={folder}"]
    adapt = tmp / "adapt"
    assert main(["train", str(CONFIGS / "adapt" / "foodiml.yaml"), "--out", str(adapt), "--no-progress",
                 *data, *SMALL]) == 0
    dual_cfg = tmp / "dual.yaml"
    dual_cfg.write_text(f"""
name: foodiml-dual
data: {{format: foodiml, path: {csv}, options: {{image_root: {folder}}}}}
model:
  type: dual_encoder
  embed_dim: 64
  image: {{name: efficientnet_lite0, args: {{image_size: 96}}, frozen: true}}
  text: {{name: bigru, args: {{word_dim: 32, out_dim: 64}}, frozen: false}}
  image_head: {{input: pooled, proj: linear}}
  text_head: {{input: pooled, proj: linear}}
loss: {{name: infonce}}
optim: {{name: adam, lr: 0.003, schedule: constant}}
train: {{steps: 60, batch_size: 16, eval_every: 30, log_every: 10, tensorboard: false}}
""")
    dual = tmp / "dual"
    assert main(["train", str(dual_cfg), "--out", str(dual), "--no-progress"]) == 0
    yield {"adapt": adapt, "dual": dual, "tmp": tmp}
    mp.undo()


def test_adapt_trains_and_evaluates_from_the_cli(runs, capsys):
    run = runs["adapt"]
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses
    exact = _metrics(capsys, ["eval", str(run), "--json"])
    # 21 images, each caption has 2-3 positives: chance R@1 is ~11%, rsum ~200
    assert exact["rsum"] > 300, exact

    # the dual encoder shortlists, ADAPT re-ranks
    dual = runs["dual"]
    full = _metrics(capsys, ["eval", str(run), "--json", "--first-stage", str(dual), "--rerank-k", "21"])
    assert full == pytest.approx(exact)  # a shortlist of everything is the exact ranking
    short = _metrics(capsys, ["eval", str(run), "--json", "--first-stage", str(dual), "--rerank-k", "3"])
    first = _metrics(capsys, ["eval", str(dual), "--json"])
    # re-ranking only permutes the top 3: recall at 5 and 10 are the first stage's
    for key in ("t2i_r5", "t2i_r10", "i2t_r5", "i2t_r10"):
        assert short[key] == pytest.approx(first[key]), key


def _brute_force(adapt_run, split_images: list[str], query: str) -> list[str]:
    """ADAPT's own order of every image for one caption, scored directly (the reference)."""
    import torch

    from xmodal.models import load
    from xmodal.search.rerank import _pixels

    model = load(adapt_run).model
    with torch.inference_mode():
        img = model.encode_image_reps(_pixels(model, split_images, "test"))
        scores = model.score(img, model.encode_text_reps([query]))[:, 0]
    order = torch.argsort(-scores, stable=True)
    return [split_images[i] for i in order.tolist()], scores[order].tolist()


def test_search_reranks_with_the_pair_scorer(runs, catalogue, capsys):
    folder, csv, _ = catalogue
    index = runs["tmp"] / "test.idx"
    capsys.readouterr()
    assert main(["index", str(runs["dual"]), "--data", "split:test", "--out", str(index)]) == 0
    query = "tarta de queso postres porción"
    capsys.readouterr()
    assert main(["search", str(index), query, "-k", "5", "--json", "--rerank", str(runs["adapt"]),
                 "--rerank-k", "21"]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    test = load_dataset("foodiml", csv, "test")
    paths = [str(test.image_path(i)) for i in range(test.num_images)]
    ref_paths, ref_scores = _brute_force(runs["adapt"], paths, query)
    # shortlist = the whole index: the re-ranked top 5 is ADAPT's exact top 5 (stores that
    # share a picture tie, so compare each result's own reference score, and the sequence)
    ref = {str(Path(p).resolve()): sc for p, sc in zip(ref_paths, ref_scores)}
    assert [r["score"] for r in got] == pytest.approx(ref_scores[:5], abs=1e-5)
    assert [ref[str(Path(r["path"]).resolve())] for r in got] == pytest.approx(ref_scores[:5], abs=1e-5)

    # a short shortlist re-orders only the dual encoder's top 3
    assert main(["search", str(index), query, "-k", "3", "--json"]) == 0
    first = {r["id"] for r in json.loads(capsys.readouterr().out)["results"]}
    assert main(["search", str(index), query, "-k", "3", "--json", "--rerank", str(runs["adapt"]),
                 "--rerank-k", "3"]) == 0
    reranked = json.loads(capsys.readouterr().out)["results"]
    assert {r["id"] for r in reranked} == first
    assert [r["score"] for r in reranked] == sorted((r["score"] for r in reranked), reverse=True)


def test_reranker_refuses_what_it_cannot_score(runs, tmp_path):
    from xmodal.errors import ConfigError, XmodalError
    from xmodal.index import Index
    from xmodal.models import load
    from xmodal.search import Reranker

    with pytest.raises(ConfigError, match="not a pair scorer"):
        Reranker(load(runs["dual"]))
    with pytest.raises(XmodalError, match="rerank-k"):
        Reranker(load(runs["adapt"]), k=0)
    index = runs["tmp"] / "test.idx"
    if (index / "manifest.json").exists():
        rr = Reranker(load(runs["adapt"]), k=5)
        with pytest.raises(XmodalError, match="image query against a image index|has none"):
            rr.rerank(Index.open(index), "x.png", "image", np.arange(3), 3)


def test_first_stage_errors(catalogue, tmp_path, capsys):
    folder, csv, _ = catalogue
    assert main(["eval", str(tmp_path / "nope"), "--first-stage", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_serve_service_reranks_like_search(runs):
    from xmodal.index import Index
    from xmodal.models import load
    from xmodal.search import Reranker, search_text
    from xmodal.index.build import load_index_run
    from xmodal.serve.app import load_service

    index = runs["tmp"] / "test.idx"
    if not (index / "manifest.json").exists():
        assert main(["index", str(runs["dual"]), "--data", "split:test", "--out", str(index)]) == 0
    service = load_service(index, rerank=runs["adapt"], rerank_k=21)
    assert service.info()["reranker"] == {"type": "Adapt", "k": 21}
    query = "agua mineral bebidas botella 50cl"
    served = service.search_text(query, 4)
    ix = Index.open(index)
    direct = search_text(ix, load_index_run(ix), query, 4, reranker=Reranker(load(runs["adapt"]), k=21))
    assert [r["id"] for r in served] == [r["id"] for r in direct]
    assert [r["score"] for r in served] == pytest.approx([r["score"] for r in direct])


def test_reranker_fusion_adds_the_index_score(runs):
    """``fusion = w``: the shortlist is ordered by pair score + w x index score, in search and serve."""
    from xmodal.errors import XmodalError
    from xmodal.index import Index
    from xmodal.models import load
    from xmodal.search import Reranker, encode_text_queries, search_text
    from xmodal.index.build import load_index_run
    from xmodal.serve.app import load_service

    index = runs["tmp"] / "test.idx"
    if not (index / "manifest.json").exists():
        assert main(["index", str(runs["dual"]), "--data", "split:test", "--out", str(index)]) == 0
    ix = Index.open(index)
    query = "agua mineral bebidas botella 50cl"
    first, rows = ix.search(encode_text_queries(load_index_run(ix), [query]), 21)
    adapt = load(runs["adapt"])
    s0, r0 = Reranker(adapt, k=21, fusion=0.0).rerank(ix, query, "text", rows[0], 21)
    s1, r1 = Reranker(adapt, k=21, fusion=2.0).rerank(ix, query, "text", rows[0], 21, first_scores=first[0])
    pair = dict(zip(r0.tolist(), s0.tolist()))
    index_score = dict(zip(rows[0].tolist(), first[0].tolist()))
    want = sorted(((pair[r] + 2.0 * index_score[r], r) for r in pair), key=lambda x: -x[0])
    assert s1 == pytest.approx([w for w, _ in want], abs=1e-5)
    assert sorted(r1.tolist()) == sorted(pair)
    with pytest.raises(XmodalError, match="index's scores"):
        Reranker(adapt, k=21, fusion=2.0).rerank(ix, query, "text", rows[0], 21)
    served = load_service(index, rerank=runs["adapt"], rerank_k=21, rerank_fusion=2.0).search_text(query, 4)
    direct = search_text(ix, load_index_run(ix), query, 4, reranker=Reranker(adapt, k=21, fusion=2.0))
    assert [r["id"] for r in served] == [r["id"] for r in direct]
    assert [r["score"] for r in direct] == pytest.approx([w for w, _ in want[:4]], abs=1e-5)


def test_ensemble_config_is_evaluated_not_trained(runs, tmp_path, capsys):
    """ADAPT-Ens from the CLI: a config naming finished runs is evaluated directly."""
    import yaml

    from xmodal.models import load
    from xmodal.models.adapt import AdaptEnsemble

    cfg = yaml.safe_load((runs["adapt"] / "config.yaml").read_text())
    # two members (the same run twice keeps the test fast): the average of equal scores
    cfg["model"]["args"] = {"variant": "ens", "members": [str(runs["adapt"])] * 2}
    ens = tmp_path / "ens.yaml"
    ens.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(ens), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "nothing to train" in capsys.readouterr().err
    got = _metrics(capsys, ["eval", str(ens), "--json"])
    assert got == pytest.approx(_metrics(capsys, ["eval", str(runs["adapt"]), "--json"]))
    assert isinstance(load(ens).model, AdaptEnsemble) and load(ens).kind == "pair"


@pytest.mark.parametrize("name", ["emoji/adapt_ens.yaml", "adapt/coco_precomp_ens.yaml"])
def test_shipped_ensemble_configs_build(runs, name):
    """The packaged ensemble configs carry no member-level settings: they build from two runs."""
    from xmodal.config import load_config
    from xmodal.models import create_model
    from xmodal.models.adapt import AdaptEnsemble

    run = runs["adapt"]
    cfg = load_config(CONFIGS / name, overrides=[f"model.args.members=[{run}, {run}]"])
    assert isinstance(create_model(cfg.model), AdaptEnsemble)


def test_rerank_sweep_benchmark_runs(runs, tmp_path):
    """benchmarks/rerank_sweep.py: the first stage alone, then each (k, W), with the same metrics
    as xmodal eval gives for them."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "rerank_sweep.py"
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, str(script), "--pair", str(runs["adapt"]), "--first", str(runs["dual"]),
                           "--ks", "3", "--fusions", "0", "1", "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["k"], r["fusion"]) for r in rows] == [(None, None), (3, 0.0), (3, 1.0)]
    assert all(r["s_per_query"] > 0 for r in rows)
    from xmodal.eval.encode import evaluate_split, first_stage_for
    from xmodal.models import load
    from xmodal.data.pipeline import prepare_split

    adapt_run, dual_run = load(runs["adapt"]), load(runs["dual"])
    adapt, dual = adapt_run.model, dual_run.model
    split = adapt_run.config.data.test_split
    data = prepare_split(adapt_run.config, adapt, split, adapt_run.config.data.eval_lang, progress=False)
    ddata = prepare_split(dual_run.config, dual, split, adapt_run.config.data.eval_lang, progress=False)
    want = evaluate_split(adapt, data, rerank_k=3, first_stage=first_stage_for(dual, ddata, data), rerank_fusion=1.0,
                          return_ranks=True)
    assert rows[2]["metrics"] == pytest.approx(want["metrics"])
    alone = evaluate_split(dual, ddata, return_ranks=True)
    assert rows[0]["metrics"] == pytest.approx(alone["metrics"])
    for d in ("i2t", "t2i"):  # rank-1 changes against the first stage alone, counted here query by query
        a, b = alone[f"{d}_ranks"], want[f"{d}_ranks"]
        got = rows[2]["rank1_changes"][d]
        assert (got["won"], got["lost"]) == (int(((a > 0) & (b == 0)).sum()), int(((a == 0) & (b > 0)).sum()))
