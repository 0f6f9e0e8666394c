"""``xmodal pretrained open_clip:ARCH:FILE`` (issue #20), offline, against OpenCLIP itself.

A tiny randomly initialised OpenCLIP ``CLIP`` (``pretrained_fixtures.write_tiny_open_clip``: its
model config JSON and a ``torch.save``'d training checkpoint) becomes a run whose embeddings
must equal OpenCLIP's own ``encode_image`` / ``encode_text`` after its own ``preprocess`` and
tokenizer; then eval, index, search, fine-tuning and ADAPT over its patch tokens run on it.

open-clip-torch needs a torchvision that imports beside torch: where it does not (the project's
torch 2.13), these tests skip, and only the checks that need no OpenCLIP run (the clear error,
the safe weight reader).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from pretrained_fixtures import IMAGE, OPEN_CLIP_ARCH, OPEN_CLIP_CONTEXT, PATCH, write_tiny_open_clip  # noqa: E402

from xmodal.cli import main  # noqa: E402
from xmodal.errors import ConfigError, XmodalError  # noqa: E402

try:
    import open_clip
    OPEN_CLIP_ERROR = None
except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision failing to import beside this torch
    open_clip, OPEN_CLIP_ERROR = None, f"{type(exc).__name__}: {exc}"

needs_open_clip = pytest.mark.skipif(
    OPEN_CLIP_ERROR is not None,
    reason=f"open_clip does not import here ({OPEN_CLIP_ERROR}); it needs open-clip-torch and a torchvision that "
           "imports beside this torch (e.g. torch 2.14.1 + torchvision 0.29.1, docs/pretrained.md)")

TEXTS = ["a red circle", "two dogs playing in the snow next to a small wooden house", "x", "A CAT!"]
#: (h, w): landscape, portrait, exact, smaller than the crop, and an odd crop margin (35 - 32 = 3:
#: torchvision's CenterCrop rounds the offset to 2, transformers' floors it to 1)
SIZES = ((40, 50), (64, 33), (32, 32), (17, 90), (32, 35), (35, 32))


def _images() -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    if OPEN_CLIP_ERROR is not None:
        pytest.skip("open_clip does not import here")
    return write_tiny_open_clip(tmp_path_factory.mktemp("open_clip_src"))


@pytest.fixture(scope="module")
def spec(source) -> str:
    config, weights = source
    return f"open_clip:{config}:{weights}"


@pytest.fixture(scope="module")
def run_dir(spec, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("open_clip_runs") / "run"
    assert main(["pretrained", spec, "--out", str(out), "--json"]) == 0
    return out


def _reference(source: tuple[Path, Path], images: list, texts: list[str]) -> tuple[torch.Tensor, ...]:
    """OpenCLIP's own: create_model_and_transforms(arch, pretrained=FILE), its preprocess, its tokenizer."""
    config, weights = source
    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms(OPEN_CLIP_ARCH, pretrained=str(weights))
    model.eval()
    tokenizer = open_clip.get_tokenizer(OPEN_CLIP_ARCH)
    pixels = torch.stack([preprocess(im) for im in images])  # (B, 3, H, W), normalised
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(tokenizer(texts)), pixels, model


# ------------------------------------------------------------------------------------------
# the run scores as OpenCLIP does
# ------------------------------------------------------------------------------------------
@needs_open_clip
def test_open_clip_run_embeddings_equal_open_clip(source, run_dir):
    from xmodal.models import load

    run = load(run_dir)
    assert run.kind == "embedding" and run.step == 0
    tower = run.model.tower("image")
    images = _images()
    ref_img, ref_txt, ref_pixels, _ = _reference(source, images, TEXTS)
    ours = torch.stack([tower.preprocess(im) for im in images])
    torch.testing.assert_close(tower.pixel_values(ours), ref_pixels, atol=1e-5, rtol=0)  # the same pixels
    with torch.no_grad():
        img, txt = run.model.encode_image(ours), run.model.encode_text(TEXTS)
    assert img.shape == ref_img.shape == (len(images), 16) and txt.shape == ref_txt.shape == (len(TEXTS), 16)
    assert F.cosine_similarity(img, ref_img).min() >= 0.9999
    assert F.cosine_similarity(txt, ref_txt).min() >= 0.9999
    torch.testing.assert_close(img, F.normalize(ref_img, dim=-1), atol=1e-5, rtol=0)


@needs_open_clip
def test_open_clip_run_layout_and_loss(source, run_dir):
    from xmodal.config import load_config
    from xmodal.models.pretrained import parse_source, source_digest

    info = json.loads((run_dir / "best" / "pretrained.json").read_text())
    assert info["family"] == "open_clip-clip" and info["logit_bias"] is None
    assert info["logit_scale"] == pytest.approx(50.0, rel=1e-5)  # the checkpoint's, not the init's 1 / 0.07
    cfg = load_config(run_dir / "config.yaml")
    config, weights = source
    assert cfg.model.image.args["source"] == f"open_clip:{config}:{weights}" == cfg.model.text.args["source"]
    assert cfg.model.image.args["sha256"] == info["sha256"] == source_digest(parse_source(info["source"]))
    assert cfg.model.embed_dim == 16 and cfg.loss.name == "infonce"
    assert cfg.loss.args["init_temperature"] == pytest.approx(1 / 50.0, rel=1e-5)


@needs_open_clip
def test_registered_arch_and_safetensors_load_the_same_model(source, tmp_path):
    """``open_clip:NAME:FILE`` for an architecture registered with add_model_config, and a
    safetensors file of the same weights (seed 0): the same embeddings; its tokens are OpenCLIP's
    own token states, projected."""
    from xmodal.models.base import IMAGE_TOWERS, TEXT_TOWERS

    _, safe = write_tiny_open_clip(tmp_path, suffix=".safetensors")
    open_clip.add_model_config(source[0])
    src = f"open_clip:{OPEN_CLIP_ARCH}:{safe}"
    image, text = IMAGE_TOWERS.create("pretrained_image", source=src), TEXT_TOWERS.create("pretrained_text", source=src)
    _, ref_txt, ref_pixels, ref = _reference(source, _images(), TEXTS)
    pixels = torch.stack([image.preprocess(im) for im in _images()])
    with torch.no_grad():
        out, words = image(pixels), text(text.tokenize(TEXTS))
        ref.visual.output_tokens = True
        ref_pooled, ref_tokens = ref.visual(ref_pixels)  # (B, E), (B, P, W)
    n_patches = (IMAGE // PATCH) ** 2
    assert out.tokens.shape == (len(pixels), n_patches, 16) and image.output_dim == image.token_dim == 16
    torch.testing.assert_close(out.pooled, ref_pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.tokens, ref_tokens @ ref.visual.proj, atol=1e-5, rtol=0)
    torch.testing.assert_close(words.pooled, ref_txt, atol=1e-5, rtol=0)
    assert words.tokens.shape == (len(TEXTS), OPEN_CLIP_CONTEXT, 16)
    ids = text.tokenize(TEXTS)["input_ids"]
    eot = ids.argmax(dim=-1)  # CLIP's end-of-text token has the highest id: the pooled position
    torch.testing.assert_close(words.tokens[torch.arange(len(TEXTS)), eot], words.pooled, atol=1e-5, rtol=0)
    assert words.mask.sum(dim=1).tolist() == (eot + 1).tolist()  # start, words, end of text
    with torch.no_grad():
        everything = IMAGE_TOWERS.create("pretrained_image", source=src, tokens="all")(pixels)
    assert everything.tokens.shape == (len(pixels), 1 + n_patches, 16)
    torch.testing.assert_close(everything.tokens[:, 0], out.pooled)


@needs_open_clip
@pytest.mark.parametrize("mode,size", [("shortest", (32, 32)), ("shortest", (24, 32)), ("squash", (32, 32)),
                                       ("longest", (32, 32)), ("longest", (24, 32))])
def test_preprocessing_equals_open_clips_transform(mode, size):
    """open_clip.image_transform(is_train=False) for every resize mode, square and not, with a
    fill colour for ``longest``: the same pixels."""
    from open_clip.transform import image_transform

    from xmodal.models.pretrained import open_clip_preprocessing

    cfg = {"size": size, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bilinear",
           "resize_mode": mode, "fill_color": 77}
    pp = open_clip_preprocessing(cfg, None, open_clip)
    ref = image_transform(size, is_train=False, mean=cfg["mean"], std=cfg["std"], resize_mode=mode,
                          interpolation="bilinear", fill_color=77)
    weight = torch.tensor([pp.rescale / s for s in pp.std]).view(3, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(pp.mean, pp.std)]).view(3, 1, 1)
    for im in _images():
        ours = pp.apply(im).float() * weight + bias
        want = ref(im)
        assert ours.shape == want.shape == (3, *size)
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


@needs_open_clip
def test_timm_trunk_custom_text_sigmoid_model(tmp_path):
    """OpenCLIP's SigLIP layout (a timm ViT trunk, a custom text tower, a logit bias): embeddings
    equal OpenCLIP's, the sigmoid loss with the model's scale and bias, tokens on both sides."""
    from pretrained_fixtures import OPEN_CLIP_TIMM_ARCH, write_tiny_open_clip_timm

    from xmodal.models.base import IMAGE_TOWERS, TEXT_TOWERS
    from xmodal.models.pretrained import load_source, trained_loss

    config, weights = write_tiny_open_clip_timm(tmp_path)
    spec = f"open_clip:{config}:{weights}"
    loaded = load_source(spec)
    assert loaded.family == "open_clip-siglip"
    loss = trained_loss(loaded.model)
    assert loss["name"] == "siglip" and loss["args"]["init_bias"] == pytest.approx(-5.0)
    assert loss["args"]["init_scale"] == pytest.approx(10.0, rel=1e-5)
    ref, _, preprocess = open_clip.create_model_and_transforms(OPEN_CLIP_TIMM_ARCH, pretrained=str(weights))
    ref.eval()
    image, text = IMAGE_TOWERS.create("pretrained_image", source=spec), TEXT_TOWERS.create("pretrained_text", source=spec)
    images = _images()[:4]
    pixels = torch.stack([image.preprocess(im) for im in images])
    with torch.no_grad():
        want_img = ref.encode_image(torch.stack([preprocess(im) for im in images]))
        want_txt = ref.encode_text(open_clip.get_tokenizer(OPEN_CLIP_TIMM_ARCH)(TEXTS))
        out, words = image(pixels), text(text.tokenize(TEXTS))
        everything = IMAGE_TOWERS.create("pretrained_image", source=spec, tokens="all")(pixels)
    assert F.cosine_similarity(out.pooled, want_img).min() >= 0.9999
    assert F.cosine_similarity(words.pooled, want_txt).min() >= 0.9999
    assert out.tokens.shape == (4, (224 // 16) ** 2, 16) and everything.tokens.shape == (4, 1 + (224 // 16) ** 2, 16)
    torch.testing.assert_close(everything.tokens[:, 0], out.pooled, atol=1e-5, rtol=0)  # its CLS-token pooling
    assert words.tokens.shape == (len(TEXTS), 12, 16) and words.mask.shape == (len(TEXTS), 12)
    torch.testing.assert_close(words.tokens[:, -1], words.pooled, atol=1e-5, rtol=0)  # pooled at the last position


@needs_open_clip
def test_hugging_face_text_tower_inside_open_clip(tmp_path):
    """A ``CustomTextCLIP`` with an ``HFTextEncoder`` (a local MiniLM folder): the text embedding
    equals OpenCLIP's, tokens go through its MLP projection, the mask is the non-pad ids."""
    from pretrained_fixtures import write_tiny_open_clip_hf_text

    from xmodal.models.base import TEXT_TOWERS

    config, weights = write_tiny_open_clip_hf_text(tmp_path)
    text = TEXT_TOWERS.create("pretrained_text", source=f"open_clip:{config}:{weights}")
    open_clip.add_model_config(config)
    ref, _, _ = open_clip.create_model_and_transforms(config.stem, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(config.stem)
    batch = text.tokenize(TEXTS)
    with torch.no_grad():
        words, want = text(batch), ref.eval().encode_text(tokenizer(TEXTS))
        ref.text.output_tokens = True
        _, hidden = ref.text(tokenizer(TEXTS))  # (B, L, D) the transformer's last states
    assert F.cosine_similarity(words.pooled, want).min() >= 0.9999
    torch.testing.assert_close(words.tokens, ref.text.proj(hidden), atol=1e-5, rtol=0)
    pad = text.tokenizer.tokenizer.pad_token_id
    assert torch.equal(words.mask, batch["input_ids"] != pad) and words.mask.sum() < words.mask.numel()


@needs_open_clip
def test_open_clip_model_folder(tmp_path):
    """``open_clip:local-dir:DIR`` (config, preprocess config and weights in one folder): the run
    scores as ``create_model_and_transforms("local-dir:DIR")``, with the folder's own
    preprocessing (squash, bilinear, mean / std 0.5), pinned by sha256 and named by absolute path."""
    from pretrained_fixtures import write_tiny_open_clip_dir

    from xmodal.config import load_config
    from xmodal.models import load

    folder = write_tiny_open_clip_dir(tmp_path / "model")
    out = tmp_path / "run"
    assert main(["pretrained", f"open_clip:local-dir:{folder}", "--out", str(out), "--json"]) == 0
    cfg = load_config(out / "config.yaml")
    assert cfg.model.image.args["source"] == f"open_clip:local-dir:{folder.resolve()}"
    assert len(cfg.model.image.args["sha256"]) == 64
    run = load(out)
    ref, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    images = _images()
    tower = run.model.tower("image")
    assert tower.preprocessing.size == (IMAGE, IMAGE) and tower.preprocessing.resample == 2  # squash, bilinear
    pixels = torch.stack([tower.preprocess(im) for im in images])
    torch.testing.assert_close(tower.pixel_values(pixels), torch.stack([preprocess(im) for im in images]),
                               atol=1e-5, rtol=0)
    with torch.no_grad():
        want_img = ref.eval().encode_image(torch.stack([preprocess(im) for im in images]))
        want_txt = ref.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(TEXTS))
        assert F.cosine_similarity(run.model.encode_image(pixels), want_img).min() >= 0.9999
        assert F.cosine_similarity(run.model.encode_text(TEXTS), want_txt).min() >= 0.9999
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(XmodalError, match="no weight file"):
        load(out)


# ------------------------------------------------------------------------------------------
# every verb takes the run; fine-tuning; patch tokens under ADAPT
# ------------------------------------------------------------------------------------------
@needs_open_clip
def test_eval_index_search_on_an_open_clip_run(run_dir, tmp_path, capsys):
    from xmodal.data.pipeline import prepare_split
    from xmodal.eval.encode import embed_split
    from xmodal.eval.protocols import evaluate_embeddings
    from xmodal.models import load

    assert main(["eval", str(run_dir), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = load(run_dir)
    split = prepare_split(run.config, run.model, run.config.data.test_split, "en", progress=False)
    img, txt = embed_split(run.model, split)  # from the cache the eval filled
    assert evaluate_embeddings(img, txt, split.dataset.gt) == metrics

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
    with torch.no_grad():  # brute force over the model itself
        emb = run.model.encode_image(torch.stack([run.model.tower("image").preprocess(im) for im in images]))
        scores = emb @ run.model.encode_text([query])[0]
    want = [f"p{i}.png" for i in scores.argsort(descending=True)[:3].tolist()]
    assert [Path(r["id"]).name for r in found] == want
    torch.testing.assert_close(torch.tensor([r["score"] for r in found]), scores.sort(descending=True).values[:3],
                               atol=1e-5, rtol=0)
    from xmodal.index import Index
    from xmodal.index.build import load_index_run
    from xmodal.serve import SearchService

    opened = Index.open(index)  # the web service: text and uploaded-image queries
    service = SearchService(opened, load_index_run(opened), max_batch=1)
    assert [Path(r["id"]).name for r in service.search_text(query, 3)] == want
    assert Path(service.search_image(images[2], 1)["images"][0]["id"]).name == "p2.png"


_SHORT = ["train.steps=2", "train.batch_size=8", "train.eval_every=0", "train.log_every=1",
          "train.tensorboard=false", "data.train_split=test", "data.val_split=test", "optim.lr=1e-3",
          "optim.warmup_steps=0", "--no-progress"]


@needs_open_clip
def test_finetune_an_open_clip_run_from_its_own_temperature(run_dir, tmp_path):
    from safetensors.torch import load_file

    from xmodal.models import load

    ft = tmp_path / "ft"
    over = ["model.image.frozen=false", "model.text.frozen=false", "model.image.args.grad_checkpointing=true",
            "model.text.args.grad_checkpointing=true"]
    assert main(["train", str(run_dir / "config.yaml"), "--out", str(ft), *over, *_SHORT]) == 0
    steps = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "train"]
    assert steps[0]["logit_scale"] == pytest.approx(50.0, rel=1e-4)  # the checkpoint's own, not 1 / 0.07
    saved = load_file(str(ft / "best" / "model.safetensors"))
    assert any(k.startswith("image_tower.model.visual.") for k in saved)
    assert any(k.startswith("text_tower.model.transformer.") for k in saved)
    assert not any(k.startswith("image_tower.model.transformer.") for k in saved)  # each tower keeps its half
    tuned, base = load(ft), load(run_dir)
    assert tuned.model.tower("image").model.visual.transformer.grad_checkpointing
    name = "image_tower.model.visual.proj"
    assert not torch.equal(tuned.model.state_dict()[name], base.model.state_dict()[name])  # trained
    with torch.no_grad():
        emb = tuned.model.encode_text(TEXTS)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(TEXTS)))


@needs_open_clip
def test_adapt_trains_over_open_clip_patch_tokens(spec):
    """ADAPT reads the frozen OpenCLIP patch tokens and the trainable text tower's token states
    (with their mask), and takes a training step."""
    from xmodal.config import from_dict
    from xmodal.data.inputs import Batch
    from xmodal.losses import create_loss
    from xmodal.models import create_model
    from xmodal.train.tasks import build_task

    model = {"type": "adapt", "image": {"name": "pretrained_image", "args": {"source": spec}, "frozen": True},
             "text": {"name": "pretrained_text", "args": {"source": spec}, "frozen": False},
             "args": {"variant": "t2i", "fused": "eager"}}
    cfg = from_dict({"model": model, "loss": {"name": "adapt_hinge", "args": {"margin": 0.2}}})
    torch.manual_seed(0)
    net = create_model(cfg.model)
    pixels = torch.stack([net.tower("image").preprocess(im) for im in _images()[:4]])
    scores = net.score(net.encode_image_reps(pixels), net.encode_text_reps(TEXTS))
    assert scores.shape == (4, len(TEXTS)) and torch.isfinite(scores).all()
    task = build_task(net, create_loss(cfg.loss.name, **cfg.loss.args))
    task.train()
    losses, _ = task.training_step(Batch(np.arange(4), np.arange(4), torch.eye(4, dtype=torch.bool), pixels, TEXTS),
                                   step=0)
    sum(losses.values()).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in net.tower("image").parameters())  # frozen patches


# ------------------------------------------------------------------------------------------
# errors: offline hub tags, unknown names, unsafe or wrong weights, pinned files
# ------------------------------------------------------------------------------------------
@needs_open_clip
def test_hub_tag_offline_fails_with_a_clear_message(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from xmodal.models.pretrained import PretrainedTextTower

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # not cached
    with pytest.raises(XmodalError) as info:
        PretrainedTextTower("open_clip:RN50:openai")
    line = str(info.value)
    assert line.startswith("open_clip:RN50:openai: cannot download the weights from the Hugging Face hub")
    assert "offline, pass a weight file (open_clip:ARCH:FILE)" in line and "\n" not in line
    with pytest.raises(XmodalError, match=r"^open_clip:hf-hub:xmodal-tests/no-such-model: cannot download"):
        PretrainedTextTower("open_clip:hf-hub:xmodal-tests/no-such-model")


@needs_open_clip
def test_bad_open_clip_sources(source, tmp_path):
    from xmodal.models.pretrained import load_source

    config, weights = source
    with pytest.raises(ConfigError, match="unknown architecture"):
        load_source("open_clip:No-Such-ViT:x.pt")
    with pytest.raises(ConfigError, match=r"neither a pretrained tag of ViT-B-32 \(tags: openai, .*\) nor a weight"):
        load_source("open_clip:ViT-B-32:no_such_tag")
    with pytest.raises(XmodalError, match="no such weight file"):
        load_source(f"open_clip:{config}:{tmp_path / 'missing.pt'}")
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 8}')
    with pytest.raises(ConfigError, match=rf"{bad}: not an open_clip model config: no vision_cfg, text_cfg"):
        load_source(f"open_clip:{bad}:{weights}")
    other = tmp_path / "other"
    other_config = other / f"{OPEN_CLIP_ARCH}-wide.json"
    other.mkdir()
    cfg = json.loads(config.read_text())
    cfg["embed_dim"] = 24
    other_config.write_text(json.dumps(cfg))
    with pytest.raises(XmodalError, match="the weights do not fit the architecture"):
        load_source(f"open_clip:{other_config}:{weights}")
    with pytest.raises(ConfigError, match="reads exactly its context length"):
        from xmodal.models.base import TEXT_TOWERS

        TEXT_TOWERS.create("pretrained_text", source=f"open_clip:{config}:{weights}", max_length=8)


@needs_open_clip
def test_sha256_pins_the_open_clip_weight_file(source, run_dir, tmp_path):
    import shutil

    from xmodal.models import load

    config, weights = source
    copy = tmp_path / "src"
    shutil.copytree(weights.parent, copy)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for path in (run / "config.yaml", run / "best" / "config.yaml"):
        path.write_text(path.read_text().replace(str(weights.parent), str(copy)))
    from xmodal.train.checkpoint import write_manifest

    write_manifest(run / "best")
    load(run)  # the moved files, the config pointed at them, still load
    data = bytearray((copy / weights.name).read_bytes())
    data[-1] ^= 1
    (copy / weights.name).write_bytes(bytes(data))
    with pytest.raises(XmodalError, match="weight files changed since the run was written"):
        load(run)


def test_weights_are_read_without_unpickling_objects(tmp_path):
    """A torch.save'd checkpoint holding an arbitrary object is refused (weights_only=True), with
    or without OpenCLIP; a training checkpoint's state_dict and module. prefix are unwrapped."""
    import argparse

    from xmodal.models.pretrained import read_open_clip_state

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, str(evil))
    with pytest.raises(XmodalError, match=r"evil.pt: cannot read it with torch.load\(weights_only=True\)"):
        read_open_clip_state(evil)
    good = tmp_path / "good.pt"
    torch.save({"epoch": 3, "state_dict": {"module.w": torch.ones(2), "module.v": torch.zeros(1)}}, str(good))
    assert sorted(read_open_clip_state(good)) == ["v", "w"]
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, str(empty))
    with pytest.raises(XmodalError, match="holds no state dict of tensors"):
        read_open_clip_state(empty)


@pytest.mark.skipif(OPEN_CLIP_ERROR is None, reason="open_clip imports here: its loading is tested above")
def test_open_clip_missing_is_one_clear_error():
    from xmodal.models.pretrained import PretrainedImageTower

    with pytest.raises(XmodalError, match="needs open-clip-torch and a working torchvision") as info:
        PretrainedImageTower("open_clip:ViT-B-32:openai")
    assert "\n" not in str(info.value)


def test_open_clip_spec_parsing():
    from xmodal.models.pretrained import parse_source

    src = parse_source("open_clip:ViT-B-32:laion2b_s34b_b79k")
    assert (src.kind, src.name, src.pretrained) == ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    src = parse_source("open_clip:/models/tiny.json:/models/tiny.safetensors")
    assert (src.name, src.pretrained) == ("/models/tiny.json", "/models/tiny.safetensors")
    src = parse_source("open_clip:hf-hub:timm/ViT-B-16-SigLIP")
    assert (src.name, src.pretrained) == ("hf-hub:timm/ViT-B-16-SigLIP", None)
    assert parse_source("open_clip:local-dir:/models/oc").name == "local-dir:/models/oc"
    with pytest.raises(ConfigError, match="open_clip:local-dir: names no folder"):
        parse_source("open_clip:local-dir:")
