"""Pretrained CLIP-family dual encoders (issue #20, parts 1 and 2), offline.

Tiny random CLIP and SigLIP models are built from ``transformers`` configs and saved with
``save_pretrained`` (``pretrained_fixtures``); ``xmodal pretrained hf:DIR`` turns each into a run
whose embeddings must equal ``transformers``' own ``get_image_features`` / ``get_text_features``
after the model's own processor and tokenizer; then eval, index, search, fine-tuning and the
patch tokens of the region models are exercised on them.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from pretrained_fixtures import PATCH, IMAGE, write_tiny_clip, write_tiny_siglip  # noqa: E402

from xmodal.cli import main  # noqa: E402
from xmodal.config import load_config  # noqa: E402
from xmodal.errors import ConfigError, XmodalError  # noqa: E402

FAMILIES = ("clip", "siglip")
TEXTS = ["a red circle", "two dogs playing in the snow next to a small wooden house", "x", "A CAT!"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained_src")
    return {"clip": write_tiny_clip(root / "clip"), "siglip": write_tiny_siglip(root / "siglip")}


@pytest.fixture(scope="module")
def runs(sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained_runs")
    out = {}
    for family, src in sources.items():
        assert main(["pretrained", f"hf:{src}", "--out", str(root / family), "--json"]) == 0
        out[family] = root / family
    return out


def _images() -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = ((40, 50), (64, 33), (32, 32), (17, 90))  # (h, w): landscape, portrait, exact, smaller than the crop
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _reference(src: Path, images: list, texts: list[str], padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own embeddings: its processor, tokenizer and get_*_features."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(src)).eval()
    processor = AutoImageProcessor.from_pretrained(str(src), backend="pil")
    tok = AutoTokenizer.from_pretrained(str(src))
    enc = tok(texts, padding=padding, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
    return img, txt


# ------------------------------------------------------------------------------------------
# part 1: the run scores as the model does
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_run_embeddings_equal_transformers(family, sources, runs):
    from xmodal.models import load

    run = load(runs[family])
    assert run.kind == "embedding" and run.step == 0
    image_tower = run.model.tower("image")
    images = _images()
    padding = "max_length" if family == "siglip" else "longest"  # SigLIP pads as it was trained
    ref_img, ref_txt = _reference(sources[family], images, TEXTS, padding)
    with torch.no_grad():
        img = run.model.encode_image(torch.stack([image_tower.preprocess(im) for im in images]))
        txt = run.model.encode_text(TEXTS)
    assert img.shape == ref_img.shape and txt.shape == ref_txt.shape
    assert F.cosine_similarity(img, ref_img).min() >= 0.9999
    assert F.cosine_similarity(txt, ref_txt).min() >= 0.9999
    torch.testing.assert_close(img, F.normalize(ref_img, dim=-1), atol=1e-5, rtol=0)
    assert run.model.tower("text").padding == padding


@pytest.mark.parametrize("family", FAMILIES)
def test_preprocessing_equals_the_models_processor(family, sources, runs):
    """Resize (int() of the long side, the processor's filter), crop, rescale, normalise."""
    from transformers import AutoImageProcessor

    from xmodal.models import load

    tower = load(runs[family]).model.tower("image")
    processor = AutoImageProcessor.from_pretrained(str(sources[family]), backend="pil")
    for im in _images():
        ref = processor(images=[im], return_tensors="pt")["pixel_values"][0]
        ours = tower.pixel_values(tower.preprocess(im)[None])[0]
        assert ours.shape == ref.shape == (3, IMAGE, IMAGE)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_pretrained_run_layout_and_loss(runs):
    from xmodal.config import load_config

    for family, run in runs.items():
        info = json.loads((run / "best" / "pretrained.json").read_text())
        assert info["family"] == family
        cfg = load_config(run / "config.yaml")
        assert cfg.model.image.args["source"] == f"hf:{(run / 'source').resolve()}"
        assert cfg.model.image.args["sha256"] == info["sha256"] and cfg.model.text.args == cfg.model.image.args
        assert (run / "best" / "manifest.json").is_file() and (run / "source" / "model.safetensors").is_file()
    clip = load_config(runs["clip"] / "config.yaml")
    assert clip.model.embed_dim == 16 and clip.loss.name == "infonce"
    assert clip.loss.args["init_temperature"] == pytest.approx(0.01)  # CLIP's own scale, ln 100
    siglip = load_config(runs["siglip"] / "config.yaml")
    assert siglip.model.embed_dim == 32 and siglip.loss.name == "siglip"
    assert siglip.loss.args["init_bias"] == pytest.approx(-7.5)
    assert siglip.loss.args["init_scale"] == pytest.approx(float(np.exp(2.3)), rel=1e-5)


def test_eval_index_search_on_a_pretrained_run(runs, tmp_path, capsys):
    """Every verb takes the run; the eval pipeline (cached frozen towers) scores as encode does,
    and the index answers a query with the brute-force top image."""
    from xmodal.data.inputs import PixelImages
    from xmodal.data.pipeline import prepare_split
    from xmodal.eval.encode import embed_split
    from xmodal.eval.protocols import evaluate_embeddings
    from xmodal.models import load

    run_dir = runs["clip"]
    assert main(["eval", str(run_dir), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = load(run_dir)
    split = prepare_split(run.config, run.model, run.config.data.test_split, "en", progress=False)
    img, txt = embed_split(run.model, split)  # from the cache the eval filled
    assert evaluate_embeddings(img, txt, split.dataset.gt) == metrics
    raw = PixelImages(split.dataset, run.model.tower("image").preprocess)
    idx = np.arange(16)
    with torch.no_grad():
        direct = run.model.encode_image(raw(idx))  # the model on the images themselves
    assert F.cosine_similarity(direct, img[idx]).min() >= 0.999  # the cache holds float16

    folder = tmp_path / "photos"
    folder.mkdir()
    images = _images()
    for i, im in enumerate(images):
        im.save(folder / f"p{i}.png")
    index = tmp_path / "index"
    assert main(["index", str(run_dir), "--data", str(folder), "--out", str(index), "--json"]) == 0
    capsys.readouterr()
    query = TEXTS[1]
    assert main(["search", str(index), query, "-k", "3", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["results"]
    with torch.no_grad():
        emb = run.model.encode_image(torch.stack([run.model.tower("image").preprocess(im) for im in images]))
        scores = emb @ run.model.encode_text([query])[0]
    want = [f"p{i}.png" for i in scores.argsort(descending=True)[:3].tolist()]
    assert [Path(r["id"]).name for r in found] == want
    torch.testing.assert_close(torch.tensor([r["score"] for r in found]), scores.sort(descending=True).values[:3],
                               atol=1e-5, rtol=0)
    # the web service: text and uploaded-image queries through the run's own preprocessing
    from xmodal.index import Index
    from xmodal.index.build import load_index_run
    from xmodal.serve import SearchService

    opened = Index.open(index)
    service = SearchService(opened, load_index_run(opened), max_batch=1)
    assert [Path(r["id"]).name for r in service.search_text(query, 3)] == want
    assert Path(service.search_image(images[2], 1)["images"][0]["id"]).name == "p2.png"


def test_sha256_pins_the_runs_copy(runs, tmp_path):
    import shutil

    from xmodal.models import load

    run = tmp_path / "run"
    shutil.copytree(runs["clip"], run)
    cfg_text = (run / "config.yaml").read_text().replace(str(runs["clip"].resolve()), str(run.resolve()))
    for path in (run / "config.yaml", run / "best" / "config.yaml"):
        path.write_text(cfg_text)
    from xmodal.train.checkpoint import write_manifest

    write_manifest(run / "best")
    load(run)  # the moved copy, its config pointed at it, still loads
    weights = run / "source" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(XmodalError, match="weight files changed since the run was written"):
        load(run)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
def test_bad_specs_and_sources(tmp_path):
    from xmodal.models.pretrained import PretrainedImageTower, parse_source

    for bad in ("clip", "hf:", "torch:x", "open_clip:"):
        with pytest.raises(ConfigError, match="expected hf:NAME_OR_DIR"):
            parse_source(bad)
    assert parse_source("open_clip:ViT-B-32:laion2b_s34b_b79k").pretrained == "laion2b_s34b_b79k"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(XmodalError, match=r"cannot load the model config from this folder"):
        PretrainedImageTower(f"hf:{empty}")


def test_hub_name_offline_fails_with_a_clear_message(monkeypatch):
    """The same loading code as a folder: offline and not cached, one clear line."""
    import huggingface_hub.constants

    from xmodal.models.pretrained import PretrainedTextTower

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(XmodalError) as info:
        PretrainedTextTower("hf:xmodal-tests/no-such-clip")
    line = str(info.value)
    assert "hf:xmodal-tests/no-such-clip: cannot load the model config from the Hugging Face hub" in line
    assert "offline, pass a folder written by save_pretrained" in line and "\n" not in line


def test_cli_errors_are_one_line_without_torch(tmp_path):
    code = ("import json, sys, contextlib, io\nfrom xmodal.cli import main\nerr = io.StringIO()\n"
            "with contextlib.redirect_stderr(err):\n    rc = main(ARGV)\n"
            "print(json.dumps({'rc': rc, 'err': err.getvalue(), 'torch': 'torch' in sys.modules}))\n")
    cases = {"nope:x": "SPEC: expected hf:NAME_OR_DIR", "hf:x": "unknown config key 'model.nope'"}
    for spec, words in cases.items():
        argv = ["pretrained", spec, "--out", str(tmp_path / "r"), "model.nope=1"]
        proc = subprocess.run([sys.executable, "-c", code.replace("ARGV", repr(argv))], capture_output=True,
                              text=True, timeout=120)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        assert res["rc"] == 2 and words in res["err"] and res["err"].count("\n") == 1, res
        assert not res["torch"]
    help_ = subprocess.run([sys.executable, "-m", "xmodal", "pretrained", "--help"], capture_output=True, text=True,
                           timeout=120)
    assert help_.returncode == 0 and "usage: xmodal pretrained" in help_.stdout


def test_out_must_be_new(runs, tmp_path, sources):
    with pytest.raises(XmodalError, match="already exists"):
        from xmodal.train.pretrained import write_pretrained_run

        write_pretrained_run(f"hf:{sources['clip']}", runs["clip"])


# ------------------------------------------------------------------------------------------
# part 2: fine-tuning from the pretrained run's config
# ------------------------------------------------------------------------------------------
_SHORT = ["train.steps=2", "train.batch_size=8", "train.eval_every=0", "train.log_every=1",
          "train.tensorboard=false", "data.train_split=test", "data.val_split=test", "optim.lr=1e-3",
          "optim.warmup_steps=0"]


def _train_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_finetune_both_towers_from_the_models_own_temperature(runs, tmp_path):
    from safetensors.torch import load_file

    from xmodal.models import load

    ft = tmp_path / "ft"
    over = ["model.image.frozen=false", "model.text.frozen=false", "model.image.args.grad_checkpointing=true",
            "model.text.args.grad_checkpointing=true"]
    assert main(["train", str(runs["clip"] / "config.yaml"), "--out", str(ft), *over, *_SHORT,
                 "--no-progress"]) == 0
    steps = [r for r in _train_log(ft) if r["kind"] == "train"]
    assert steps[0]["logit_scale"] == pytest.approx(100.0, rel=1e-4)  # CLIP's own, not InfoNCE's 1/0.07
    saved = load_file(str(ft / "best" / "model.safetensors"))
    assert any(k.startswith("image_tower.model.vision_model.") for k in saved)
    assert any(k.startswith("text_tower.model.text_model.") for k in saved)
    tuned, base = load(ft), load(runs["clip"])
    assert tuned.model.tower("image").model.vision_model.encoder.gradient_checkpointing
    name = "image_tower.model.visual_projection.weight"
    assert not torch.equal(tuned.model.state_dict()[name], base.model.state_dict()[name])  # trained
    with torch.no_grad():
        emb = tuned.model.encode_text(TEXTS)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(TEXTS)))


def test_finetune_in_bf16_autocast_on_cpu(runs, tmp_path, caplog):
    from xmodal.train.loop import _amp_setup

    cfg = load_config(str(runs["clip"] / "config.yaml"), ["train.amp=bf16"])
    assert _amp_setup(cfg, torch.device("cpu"), {}, tmp_path)[1:] == (True, torch.bfloat16)
    cfg16 = load_config(str(runs["clip"] / "config.yaml"), ["train.amp=fp16"])
    assert _amp_setup(cfg16, torch.device("cpu"), {}, tmp_path)[:2] == (None, False)
    assert "needs a CUDA device" in caplog.text
    ft = tmp_path / "ft16"
    assert main(["train", str(runs["clip"] / "config.yaml"), "--out", str(ft), "model.image.frozen=false",
                 "train.amp=bf16", *_SHORT, "--no-progress"]) == 0
    steps = [r for r in _train_log(ft) if r["kind"] == "train"]
    assert steps and all(math.isfinite(r["loss"]) for r in steps)


def test_locked_image_siglip_keeps_its_sigmoid_loss(runs, tmp_path):
    from safetensors.torch import load_file

    from xmodal.models import load

    ft = tmp_path / "lit"
    assert main(["train", str(runs["siglip"] / "config.yaml"), "--out", str(ft), "model.text.frozen=false",
                 *_SHORT, "--no-progress"]) == 0
    first = [r for r in _train_log(ft) if r["kind"] == "train"][0]
    assert "siglip_loss" in first
    assert first["logit_bias"] == pytest.approx(-7.5, abs=0.01) and first["logit_scale"] == pytest.approx(
        float(np.exp(2.3)), rel=1e-3)
    saved = load_file(str(ft / "best" / "model.safetensors"))
    assert not any(k.startswith("image_tower.") for k in saved)  # frozen, rebuilt from the pinned source
    assert any(k.startswith("text_tower.model.text_model.") for k in saved)
    run, base = load(ft), load(runs["siglip"])
    images = torch.stack([run.model.tower("image").preprocess(im) for im in _images()])
    with torch.no_grad():
        torch.testing.assert_close(run.model.encode_image(images), base.model.encode_image(images))
        assert not torch.allclose(run.model.encode_text(TEXTS), base.model.encode_text(TEXTS))


# ------------------------------------------------------------------------------------------
# part 2: a pretrained vision tower's patch tokens as region tokens
# ------------------------------------------------------------------------------------------
def test_patch_tokens_are_the_models_projected_patches(sources):
    from transformers import AutoModel

    from xmodal.models.base import IMAGE_TOWERS

    tower = IMAGE_TOWERS.create("pretrained_image", source=f"hf:{sources['clip']}")
    ref = AutoModel.from_pretrained(str(sources["clip"])).eval()
    pixels = torch.stack([tower.preprocess(im) for im in _images()])
    with torch.no_grad():
        out = tower(pixels)
        hidden = ref.vision_model(pixel_values=tower.pixel_values(pixels)).last_hidden_state  # (B, 1 + P, Dv)
        want = ref.visual_projection(ref.vision_model.post_layernorm(hidden[:, 1:]))  # (B, P, E)
    n_patches = (IMAGE // PATCH) ** 2
    assert out.tokens.shape == (len(pixels), n_patches, 16) == want.shape
    torch.testing.assert_close(out.tokens, want, atol=1e-5, rtol=0)
    assert tower.output_dim == tower.token_dim == 16
    siglip = IMAGE_TOWERS.create("pretrained_image", source=f"hf:{sources['siglip']}", tokens="all")
    with torch.no_grad():
        assert siglip(pixels).tokens.shape == (len(pixels), n_patches, 32)  # no CLS in SigLIP


_REGION_MODELS = {
    "adapt": ({"args": {"variant": "t2i", "fused": "eager"}}, {"name": "adapt_hinge", "args": {"margin": 0.2}}),
    "aladin": ({"args": {"dim": 16, "depth": 1, "heads": 2, "ff_dim": 32, "dropout": 0.0, "box_dim": 0,
                         "match_layers": 1, "match_heads": 2}},
               {"name": "aladin", "args": {"terms": ["alignment"], "max_violation": False}}),
    "cross_encoder": ({"args": {"text_init_weights": False, "dim": 32, "depth": 1, "heads": 4, "ff_dim": 64,
                                "box_dim": 0, "pair_batch": 64, "dropout": 0.0}},
                      {"name": "iais", "args": {"negatives": 2, "hard_negatives": 1, "alignment": "distributed"}}),
}


@pytest.mark.parametrize("kind", sorted(_REGION_MODELS))
def test_region_models_score_over_patch_tokens(kind, sources, tmp_path):
    """ADAPT, ALADIN and the cross-encoder build on the frozen patch tokens, take a training
    step through the loop's task, and score a block."""
    from xmodal.config import from_dict
    from xmodal.losses import create_loss
    from xmodal.models import create_model
    from xmodal.train.tasks import build_task

    model_args, loss = _REGION_MODELS[kind]
    src = f"hf:{sources['clip']}"
    model = {"type": kind, "image": {"name": "pretrained_image", "args": {"source": src}, "frozen": True},
             "text": {"name": "pretrained_text", "args": {"source": src}, "frozen": False}, **model_args}
    cfg = from_dict({"model": model, "loss": loss})
    torch.manual_seed(0)
    net = create_model(cfg.model)
    pixels = torch.stack([net.tower("image").preprocess(im) for im in _images()])
    img_reps, txt_reps = net.encode_image_reps(pixels), net.encode_text_reps(TEXTS)
    scores = net.score(img_reps, txt_reps)
    assert scores.shape == (len(pixels), len(TEXTS)) and torch.isfinite(scores).all()
    if kind == "cross_encoder":  # its task draws hard negatives from a training split: scoring shown above
        assert net.has_score_pairs()
        pairs = net.score_pairs(img_reps, txt_reps, torch.tensor([0, 3]), torch.tensor([1, 2]))
        torch.testing.assert_close(pairs, scores[[0, 3], [1, 2]], atol=1e-5, rtol=0)
        return
    task = build_task(net, create_loss(cfg.loss.name, **cfg.loss.args))
    from xmodal.data.inputs import Batch

    batch = Batch(np.arange(4), np.arange(4), torch.eye(4, dtype=torch.bool), pixels, TEXTS)
    task.train()
    losses, _ = task.training_step(batch, step=0)
    sum(losses.values()).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in net.tower("image").parameters())  # frozen patches


def test_shipped_adapt_config_and_first_stage_under_a_pair_scorer(sources, runs, tmp_path, capsys):
    """configs/pretrained/adapt_clip_patches.yaml on the tiny CLIP, then the pretrained run as the
    first stage the ADAPT run re-ranks (xmodal eval --first-stage)."""
    from xmodal.train.pretrained import DEFAULT_CONFIG

    config = DEFAULT_CONFIG.parent / "adapt_clip_patches.yaml"
    src = f"hf:{sources['clip']}"
    adapt = tmp_path / "adapt"
    assert main(["train", str(config), "--out", str(adapt), f"model.image.args.source={src}",
                 f"model.text.args.source={src}", "optim.lr=1e-4", *_SHORT[:1], "train.steps=1", *_SHORT[1:],
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(adapt), "--rerank-k", "5", "--first-stage", str(runs["clip"]), "--json"]) == 0
    two_stage = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(two_stage) >= {"rsum", "t2i_r1", "i2t_r1"} and 0 <= two_stage["rsum"] <= 600


def test_pretrained_encode_benchmark_dry_run(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "pretrained_encode.py"
    spec = importlib.util.spec_from_file_location("pretrained_encode_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--dry-run", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"images", "texts", "load"}
    assert results["images"]["min_cosine"] >= 0.9999 and results["texts"]["min_cosine"] >= 0.9999
    assert all(r["ratio"] > 0 for r in results.values())
    assert "ratio" in capsys.readouterr().out


def test_pretrained_with_a_finetuning_recipe_fills_the_models_own_terms(sources, tmp_path):
    from xmodal.config import load_config
    from xmodal.train.pretrained import DEFAULT_CONFIG

    recipe = DEFAULT_CONFIG.parent / "siglip_finetune.yaml"
    assert load_config(recipe).loss.args == {"init_scale": 10.0, "init_bias": -10.0, "learn": True}
    run = tmp_path / "run"
    assert main(["pretrained", f"hf:{sources['siglip']}", "--out", str(run), "--config", str(recipe),
                 "--json"]) == 0
    cfg = load_config(run / "config.yaml")
    assert cfg.loss.name == "siglip" and cfg.loss.args["init_bias"] == pytest.approx(-7.5)
    assert not cfg.model.image.frozen and not cfg.model.text.frozen and cfg.optim.lr == 1e-5
    assert cfg.model.image.args["grad_checkpointing"] is True and cfg.model.embed_dim == 32
    assert cfg.model.image.args["source"] == f"hf:{(run / 'source').resolve()}"


def test_resize_modes_for_non_square_images(sources):
    """``crop`` is the processor's own; ``squash`` / ``letterbox`` fit the same input size, equal
    to the shared resize functions; bad values are one clear error."""
    from PIL import Image

    from xmodal.errors import ConfigError
    from xmodal.models.base import IMAGE_TOWERS
    from xmodal.models.image.resize import resize_image

    wide = Image.new("RGB", (3 * IMAGE, IMAGE), (250, 250, 250))
    wide.paste((200, 10, 10), (0, 0, IMAGE, IMAGE))  # a red square at the left edge: crop loses it
    towers = {mode: IMAGE_TOWERS.create("pretrained_image", source=f"hf:{sources['clip']}", resize=mode)
              for mode in ("crop", "squash", "letterbox")}
    crop = towers["crop"].preprocess(wide)
    assert torch.equal(crop, towers["crop"].preprocessing.apply(wide))
    for mode in ("squash", "letterbox"):
        got = towers[mode].preprocess(wide)
        assert got.shape == crop.shape == (3, IMAGE, IMAGE)
        assert torch.equal(got, resize_image(wide, (IMAGE, IMAGE), mode))
        assert (got[0] > 150).logical_and(got[1] < 80).any()  # the red square is still there
    assert not (crop[0] > 150).logical_and(crop[1] < 80).any()
    assert (towers["letterbox"].preprocess(wide)[:, 0] > 240).all()  # padded with the white border
    with pytest.raises(ConfigError, match="pretrained_image: resize must be one of crop, squash, letterbox"):
        IMAGE_TOWERS.create("pretrained_image", source=f"hf:{sources['clip']}", resize="fit")
