"""X-MRS: multi-field text tower, translations, per-sample language draws, Recipe1M end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal.cli import main
from xmodal.config import load_config
from xmodal.data.base import CrossModalDataset, GroundTruth
from xmodal.data.translations import (FileTranslator, TranslationRow, augment_dataset, back_translate,
                                      make_translations, read_translations, write_translations)
from xmodal.errors import DataError
from xmodal.models.text.multifield import MultiFieldTextTower
from xmodal.data.inputs import BatchOrder, GroupedGroundTruth, TextGroups


# multi-field tower ---------------------------------------------------------------------------
def _tiny_tower(**kw) -> MultiFieldTextTower:
    torch.manual_seed(0)
    args = dict(fields=["title", "ingredients"], scratch=True, hidden_dim=16, num_layers=1, num_heads=2,
                dropout=0.0, max_length={"title": 8, "ingredients": 16})
    return MultiFieldTextTower(**{**args, **kw}).eval()


RECORDS = [{"title": "apple pie", "ingredients": "2 apples\nflour\nbutter"}, "tomato soup"]


def test_multifield_golden_values_and_layout():
    tower = _tiny_tower()
    batch = tower.tokenize(RECORDS)
    assert sorted(batch) == ["attention_mask", "ingredients.attention_mask", "ingredients.input_ids",
                             "title.attention_mask", "title.input_ids"]
    with torch.no_grad():
        out = tower(batch)
    lt, li = batch["title.input_ids"].shape[1], batch["ingredients.input_ids"].shape[1]
    assert out.pooled.shape == (2, 32) and tower.output_dim == 32
    assert out.tokens.shape == (2, lt + li, 32) and out.mask.shape == (2, lt + li)
    # title tokens fill the title block, ingredient tokens the ingredients block
    assert torch.all(out.tokens[:, :lt, 16:] == 0) and torch.all(out.tokens[:, lt:, :16] == 0)
    # a plain string is its first field; the other fields are empty ([CLS] [SEP] only)
    assert int(batch["ingredients.attention_mask"][1].sum()) == 2
    golden = torch.tensor([[0.8285, 0.3652, 0.7156, 0.1533], [0.2718, 0.2268, 1.0809, 0.6990]])
    assert torch.allclose(out.pooled[:, [0, 5, 16, 30]], golden, atol=1e-3), out.pooled[:, [0, 5, 16, 30]]


def test_multifield_fields_are_separate_and_padding_invariant():
    tower = _tiny_tower()
    with torch.no_grad():
        both = tower(tower.tokenize(RECORDS)).pooled
        alone = tower(tower.tokenize(RECORDS[1:])).pooled
        other = tower(tower.tokenize([{"title": "apple pie", "ingredients": "salt"}])).pooled
    assert torch.allclose(both[1], alone[0], atol=1e-5)  # padding to the batch does not change a text
    assert torch.allclose(both[0, :16], other[0, :16], atol=1e-6)  # same title -> same title part
    assert not torch.allclose(both[0, 16:], other[0, 16:], atol=1e-3)  # its own ingredients encoder
    assert tower.encoders["title"] is not tower.encoders["ingredients"]
    shared = _tiny_tower(share_encoder=True)
    assert shared.encoders["title"] is shared.encoders["ingredients"]


def test_multifield_from_hf_encoder_and_bad_input():
    tower = MultiFieldTextTower(fields=["title", "instructions"], num_layers=1, max_length=12)
    assert tower.hidden == 384 and tower.output_dim == 768
    assert len(tower.encoders["title"].model.encoder.layer) == 1
    with torch.no_grad():
        out = tower(tower.tokenize([{"title": "pancakes", "instructions": "mix. fry."}]))
    assert out.pooled.shape == (1, 768)
    with pytest.raises(Exception, match="none of the fields"):
        tower.tokenize([{"body": "x"}])


# translations file ----------------------------------------------------------------------------
def test_translations_roundtrip_and_back_translation_tags(tmp_path):
    rows = [TranslationRow("r1", "de", "Apfelkuchen"), TranslationRow("r1", "en", "apple tart", via="de"),
            TranslationRow("r2", "ru", "суп, томатный", field="title"),
            TranslationRow("r2", "ru", "4 помидора\n1 луковица", field="ingredients")]
    for suffix in (".csv", ".tsv", ".jsonl"):
        path = write_translations(rows, tmp_path / f"t{suffix}")
        got = read_translations(path)
        assert [(r.id, r.lang, r.via, r.text, r.field) for r in got] == \
            [("r1", "de", None, "Apfelkuchen", None), ("r1", "en", "de", "apple tart", None),
             ("r2", "ru", None, "суп, томатный", "title"),
             ("r2", "ru", None, "4 помидора\n1 луковица", "ingredients")]  # a line break inside a cell
        assert got[1].tag == "de>en"


@pytest.mark.parametrize("name,content,message", [
    ("a.csv", "id,language,text\nr1,de,x\n", r"a\.csv:1: header lacks lang"),
    ("b.csv", "id,lang,text\nr1,de,Apfel\nr2,de,\n", r"b\.csv:3 \[text\]: expected a non-empty string"),
    ("c.tsv", "id\tlang\ttext\nr1\tde\tApfel\textra\n", r"c\.tsv:2: 4 columns, the header has 3"),
    ("d.jsonl", '{"id": "r1", "lang": "de", "text": "x"}\n{"id": "r2", "lang": "de"\n', r"d\.jsonl:2: not a JSON"),
    ("e.jsonl", '{"id": "r1", "lang": "de>", "text": "x"}\n', r"e\.jsonl:1 \[lang\]: 'de>' is not a language"),
    ("f.jsonl", '{"id": "r1", "text": "x"}\n', r"f\.jsonl:1 \[lang\]: missing"),
    ("g.txt", "id,lang,text\n", r"g\.txt: translations must be a \.csv, \.tsv or \.jsonl"),
    ("h.csv", "", r"h\.csv: empty translations file"),
])
def test_translations_file_errors_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_translations(path)


class RecordingTranslator:
    """A stand-in MT system: tags texts with the language pair it was asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def translate(self, texts, src, tgt):
        self.calls.append((src, tgt))
        return [f"{t} [{src}->{tgt}]" for t in texts]


def test_translator_interface_passes_every_language_and_file_translator(tmp_path):
    mt = RecordingTranslator()
    rows = make_translations(mt, ["r1", "r2"], ["apple pie", "soup"], ["de", "ru", "fr"], back=["de", "ru"])
    assert mt.calls == [("en", "de"), ("en", "ru"), ("en", "fr"),  # every language as asked, no fixed German
                        ("en", "de"), ("de", "en"), ("en", "ru"), ("ru", "en")]
    assert {r.tag for r in rows} == {"de", "ru", "fr", "de>en", "ru>en"}
    path = write_translations(rows, tmp_path / "t.jsonl")
    ft = FileTranslator.from_file(path, {"r1": "apple pie", "r2": "soup"})
    assert ft.translate(["soup", "apple pie"], "en", "ru") == ["soup [en->ru]", "apple pie [en->ru]"]
    assert back_translate(ft, ["soup"], "en", "de") == ["soup [en->de] [de->en]"]  # stored de>en row
    with pytest.raises(DataError, match=r"t\.jsonl: text 'r1' has no 'ja' translation"):
        ft.translate(["apple pie"], "en", "ja")
    with pytest.raises(DataError, match="no 'en' text 'cake'"):
        ft.translate(["cake"], "en", "de")


def _small_dataset(fields: bool = False) -> CrossModalDataset:
    gt = GroundTruth.from_map([[0], [1, 2], [3]], 4)
    recs = {"title": ["pie", "soup", "cake"], "ingredients": ["apples", "tomatoes", "flour"]} if fields else None
    return CrossModalDataset("toy", "train", ["a", "b", "c", "d"], ["r1", "r2", "r3"], ["pie", "soup", "cake"], gt,
                             fields=recs)


def test_augment_dataset_adds_versions_with_the_source_positives():
    ds = _small_dataset(fields=True)
    rows = [TranslationRow("r2", "de", "Suppe", field="title"),
            TranslationRow("r2", "de", "Tomaten", field="ingredients"),
            TranslationRow("r1", "en", "tart", field="title", via="de"), TranslationRow("zz", "de", "x", field="title")]
    out = augment_dataset(ds, rows)
    assert out.text_ids[3:] == ["r2@de", "r1@de>en"]
    assert out.langs == ["en", "en", "en", "de", "en"]
    assert out.fields["title"][3:] == ["Suppe", "tart"]
    assert out.fields["ingredients"][3:] == ["Tomaten", "apples"]  # untranslated field keeps the original
    assert out.gt.images_of(3).tolist() == [1, 2] and out.gt.images_of(4).tolist() == [0]
    with pytest.raises(DataError, match="no row matches a text id"):
        augment_dataset(ds, [TranslationRow("zz", "de", "x")])
    with pytest.raises(DataError, match="fields steps"):
        augment_dataset(ds, [TranslationRow("r1", "de", "x", field="steps")])


def test_train_options_translations_reach_the_training_split(tmp_path):
    path = write_translations([TranslationRow("1F600/en/label", "de", "grinsendes Gesicht"),
                               TranslationRow("1F600/en/label", "en", "smiling face with grin", via="de")],
                              tmp_path / "t.csv")
    from xmodal.data.pipeline import load_split

    cfg = load_config(None, ["data.train_lang=en", f"data.train_options={{translations: {path}, sample_lang: true}}"])
    ds = load_split(cfg, "train", "en", training=True)
    base = load_split(cfg, "train", "en", training=False)
    assert ds.num_texts == base.num_texts + 2
    src = ds.text_ids.index("1F600/en/label")
    for tid in ("1F600/en/label@de", "1F600/en/label@de>en"):
        assert ds.gt.images_of(ds.text_ids.index(tid)).tolist() == ds.gt.images_of(src).tolist()


# per-sample language draws ----------------------------------------------------------------------
def _multilingual_gt() -> tuple[GroundTruth, list[str]]:
    """40 samples x (en, de, 3 ja paraphrases), one image each; sample 39 has English only."""
    maps, langs = [], []
    for s in range(40):
        for lang in (["en", "de", "ja", "ja", "ja"] if s < 39 else ["en"]):
            maps.append([s])
            langs.append(lang)
    return GroundTruth.from_map(maps, 40), langs


def test_language_draws_are_deterministic_per_seed_and_step():
    gt, langs = _multilingual_gt()
    grouped = GroupedGroundTruth.of(gt, langs)
    assert grouped.groups.num_groups == 40 and grouped.groups.languages == ("en", "de", "ja")
    a, b = BatchOrder(grouped, 8, seed=3), BatchOrder(grouped, 8, seed=3)
    for step in (0, 1, 7, 12):  # any step, in any order, from a fresh order: same batch
        assert all(np.array_equal(x, y) for x, y in zip(a.batch(step), b.batch(step)))
    assert np.array_equal(b.batch(5)[0], BatchOrder(grouped, 8, seed=3).batch(5)[0])
    assert not np.array_equal(a.batch(0)[0], BatchOrder(grouped, 8, seed=4).batch(0)[0])
    # a sample comes back in the next epoch with a new draw of its language
    drawn = np.concatenate([a.batch(s)[0] for s in range(5 * 40)])
    picked = np.asarray(langs)[drawn]
    texts, images = a.batch(2)
    assert np.array_equal(gt.first_image()[texts], images)  # the image is a positive of the drawn text
    # one language per sample, uniformly (~1/3 each): ja's 3 texts do not make it 3/5 of the draws
    share = {lang: float(np.mean(picked == lang)) for lang in ("en", "de", "ja")}
    assert all(0.27 < v < 0.41 for v in share.values()), share
    assert set(np.asarray(langs)[TextGroups.by_positives(gt, langs).members]) == {"en", "de", "ja"}


def test_language_weights_favour_the_source_language():
    gt, langs = _multilingual_gt()
    order = BatchOrder(GroupedGroundTruth.of(gt, langs, {"en": 4}), 8, seed=0)
    picked = np.asarray(langs)[np.concatenate([order.batch(s)[0] for s in range(400)])]
    assert 0.6 < float(np.mean(picked == "en")) < 0.74  # 4 / (4 + 1 + 1), and 1.0 for the English-only sample
    with pytest.raises(DataError, match="positive numbers"):
        GroupedGroundTruth.of(gt, langs, {"en": 0})


def test_plain_ground_truth_keeps_the_text_order():
    gt, _ = _multilingual_gt()
    order = BatchOrder(gt, 8, seed=0)
    assert order.groups is None and len(order.texts) == gt.num_texts


# Recipe1M end to end ------------------------------------------------------------------------------
DISHES = [("apple pie", ["apples", "flour", "butter"], ["Slice apples.", "Bake."], (200, 40, 40)),
          ("tomato soup", ["tomatoes", "onion", "stock"], ["Chop.", "Simmer."], (230, 120, 20)),
          ("green salad", ["lettuce", "cucumber", "oil"], ["Toss."], (40, 180, 60)),
          ("blueberry muffins", ["blueberries", "flour", "sugar"], ["Mix.", "Bake 20 min."], (50, 60, 200)),
          ("chocolate cake", ["cocoa", "eggs", "sugar"], ["Whisk.", "Bake."], (90, 50, 20)),
          ("lemon tart", ["lemons", "eggs", "butter"], ["Zest.", "Bake."], (240, 230, 60))]


def write_recipe_fixture(folder: Path, n_train: int = 48, n_val: int = 12, n_test: int = 1000) -> Path:
    """A Recipe1M folder: layer1/layer2 + one small JPEG per recipe, colour = dish.

    Train and val are a few dozen recipes; the test partition has 1,000 so that the
    ``recipe1k`` protocol (10 subsets of 1,000 recipes) runs exactly as on Recipe1M.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    layer1, layer2 = [], []
    for part, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for k in range(n):
            d = k % len(DISHES)
            title, ingr, instr, color = DISHES[d]
            rid = f"{part[:2]}{k:05d}"
            img = f"{d}{part[:2]}{k:05d}.jpg"
            layer1.append({"id": rid, "title": title, "partition": part, "url": "",
                           "ingredients": [{"text": f"{(k + j) % 5 + 1} cups {t}"} for j, t in enumerate(ingr)],
                           "instructions": [{"text": t} for t in instr]})
            layer2.append({"id": rid, "images": [{"id": img, "url": ""}]})
            path = folder / part / img[0] / img[1] / img[2] / img[3] / img
            path.parent.mkdir(parents=True, exist_ok=True)
            pix = np.clip(np.asarray(color) + rng.integers(-25, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pix).save(path, quality=90)
    (folder / "layer1.json").write_text(json.dumps(layer1))
    (folder / "layer2.json").write_text(json.dumps(layer2))
    return folder


RECIPE_CONFIG = """
name: xmrs-fixture
include: {xmrs}
data: {{path: {data}}}
model:
  embed_dim: 32
  image: {{name: efficientnet_lite0, args: {{image_size: 32}}, frozen: true}}
  text:
    args: {{num_layers: 1, num_heads: 2, hidden_dim: 16, max_length: {{title: 8, ingredients: 16, instructions: 16}}}}
optim: {{lr: 2.0e-3, schedule: constant}}
train: {{steps: 30, batch_size: 16, eval_every: 15, log_every: 10, device: cpu, amp: none, early_stop: 0,
        tensorboard: false, extract_batch_size: 256}}
"""


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe1m")
    data = write_recipe_fixture(root / "data")
    xmrs = Path(__file__).resolve().parents[1] / "src/xmodal/configs/xmrs/recipe1m.yaml"
    cfg = root / "cfg.yaml"
    cfg.write_text(RECIPE_CONFIG.format(xmrs=xmrs, data=data))
    run = root / "run"
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 0
    return run


def test_recipe1m_fixture_trains_and_evaluates_recipe1k(recipe_run, capsys):
    saved = load_config(recipe_run / "config.yaml")
    assert saved.loss.name == "triplet" and saved.loss.args == {"margin": 0.3, "intra_modal": True}
    assert saved.model.text.name == "multifield" and saved.eval.protocol == "recipe1k"
    capsys.readouterr()
    assert main(["eval", str(recipe_run), "--split", "test", "--protocol", "recipe1k", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 6 dishes: a recipe's title/ingredients pick out its dish colour among 1,000 recipes
    # (~167 of each dish, so R@1 of an exact recipe is at most ~1/167; R@10 of a chance ranking is 1%)
    assert metrics["i2t_medr"] < 250 and metrics["t2i_medr"] < 250, metrics
    assert 0 < metrics["rsum"] <= 600


def test_xmrs_config_loads_with_the_papers_settings():
    cfg = load_config(Path(__file__).resolve().parents[1] / "src/xmodal/configs/xmrs/recipe1m.yaml")
    assert cfg.model.embed_dim == 1024 and cfg.optim.lr == 1e-4
    assert cfg.model.text.args["fields"] == ["title", "ingredients", "instructions"]
    assert cfg.loss.args == {"margin": 0.3, "intra_modal": True}
    for name in ("multilingual", "english_only"):
        emoji_cfg = load_config(Path(__file__).resolve().parents[1] / f"src/xmodal/configs/emoji/{name}.yaml")
        assert emoji_cfg.model.text.name == "multifield" and emoji_cfg.model.embed_dim == 1024
    multi = load_config(Path(__file__).resolve().parents[1] / "src/xmodal/configs/emoji/multilingual.yaml")
    assert multi.data.train_options == {"sample_lang": True, "lang_weights": {"en": 27}}


# synthesis on the fixture run ---------------------------------------------------------------------
def test_synthesis_trains_resumes_exactly_and_draws(recipe_run, tmp_path, capsys):
    from safetensors.torch import load_file

    args = ["--steps", "4", "--batch-size", "8", "--no-eval", "--no-progress"]
    straight, resumed = tmp_path / "syn_a", tmp_path / "syn_b"
    assert main(["train-synthesis", str(recipe_run), "--out", str(straight), *args]) == 0
    # a run stopped after 2 steps and resumed to 4 ends exactly where the straight run does
    assert main(["train-synthesis", str(recipe_run), "--out", str(resumed), "--steps", "2", *args[2:]]) == 0
    assert main(["train-synthesis", str(recipe_run), "--out", str(resumed), *args, "--resume"]) == 0
    assert main(["train-synthesis", str(recipe_run), "--out", str(resumed), *args, "--resume", "--lr", "0.1"]) == 2
    a = load_file(str(straight / "generator.safetensors"))
    b = load_file(str(resumed / "generator.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "synthesis.json").read_text())["step"] == 4
    # an existing synthesis folder is not overwritten without --resume
    assert main(["train-synthesis", str(recipe_run), "--out", str(straight), *args]) == 2
    png = tmp_path / "pie.png"
    assert main(["synthesize", str(straight), "apple pie", "--out", str(png), "--num", "2"]) == 0
    from PIL import Image

    assert Image.open(png).size == (128, 64)
    capsys.readouterr()
    assert main(["synthesize", str(straight), "--evaluate", "--split", "val", "--json",
                 "--grid", str(tmp_path / "grid.png")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["captions"] == 12 and set(res["synthesized"]) >= {"r1", "r5", "medr"}
    assert 0 <= res["synthesized"]["r1"] <= 100 and res["real"]["r1"] > 0
    assert (tmp_path / "grid.png").stat().st_size < 300_000



# triplet warm-up ---------------------------------------------------------------------------------
def test_triplet_warmup_uses_the_mean_over_violating_negatives_then_the_hardest():
    from xmodal.errors import ConfigError
    from xmodal.losses.triplet import TripletLoss, cosine_distance

    torch.manual_seed(0)
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    pos = torch.eye(5, dtype=torch.bool)
    plain = TripletLoss(margin=0.3, intra_modal=True)
    warm = TripletLoss(margin=0.3, intra_modal=True, hardest_after=10)
    # default and steps past the warm-up: X-MRS's batch-hard loss, unchanged
    for step in (None, 0, 10, 99):
        ref = plain(img, txt, pos_mask=pos, step=step)
        got = warm(img, txt, pos_mask=pos, step=step if step is None or step >= 10 else 10)
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    # during the warm-up: per anchor, the mean hinge over the negatives that violate the margin
    d = cosine_distance(img, txt)

    def naive(dm: torch.Tensor) -> float:
        total = 0.0
        for a in range(5):
            hinges = [max(0.0, float(dm[a, a] - dm[a, n]) + 0.3) for n in range(5) if n != a]
            viol = [h for h in hinges if h > 0]
            total += sum(viol) / max(len(viol), 1)
        return total / 5

    out = warm(img, txt, pos_mask=pos, step=3)
    assert abs(float(out["triplet_loss"]) - (naive(d) + naive(d.t()))) < 1e-5
    assert float(out["triplet_loss"]) < float(plain(img, txt, pos_mask=pos)["triplet_loss"])
    with pytest.raises(ConfigError, match="hardest_after"):
        TripletLoss(hardest_after=-1)
