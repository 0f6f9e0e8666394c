"""Which frozen towers a checkpoint leaves out: only those rebuilt exactly from their files."""
from __future__ import annotations

import torch

from xmodal.config import ModelConfig, TowerConfig
from xmodal.models import create_model
from xmodal.models.run import model_state, skipped_prefixes


def _model(text: TowerConfig, image: TowerConfig):
    return create_model(ModelConfig(type="dual_encoder", embed_dim=8, image=image, text=text))


def test_pretrained_frozen_towers_are_left_out_random_ones_saved():
    feats = TowerConfig(name="features", args={"in_dim": 6, "out_dim": 8}, frozen=True)
    gru = TowerConfig(name="bigru", args={"word_dim": 4, "out_dim": 8,
                                          "tokenizer_json": _tiny_tokenizer()}, frozen=True)
    model = _model(gru, feats)
    # a frozen BiGRU and a frozen feature projection are random: rebuilding them would differ
    assert skipped_prefixes(model) == ()
    state = model_state(model)
    assert any(k.startswith("text_tower.") for k in state)
    assert any(k.startswith("image_tower.") for k in state)

    effnet = TowerConfig(name="efficientnet_lite0", args={"image_size": 64}, frozen=True)
    model = _model(gru, effnet)
    assert skipped_prefixes(model) == ("image_tower.",)  # ImageNet weights from the package
    assert not any(k.startswith("image_tower.") for k in model_state(model))
    projected = TowerConfig(name="efficientnet_lite0", args={"image_size": 64, "out_dim": 8}, frozen=True)
    assert skipped_prefixes(_model(gru, projected)) == ()  # its new projection is random


def test_frozen_random_tower_reloads_identically(tmp_path):
    from xmodal.models.run import load_weights

    gru = TowerConfig(name="bigru", args={"word_dim": 4, "out_dim": 8, "tokenizer_json": _tiny_tokenizer()},
                      frozen=True)
    feats = TowerConfig(name="features", args={"in_dim": 6, "out_dim": 8}, frozen=False)
    torch.manual_seed(0)
    a = _model(gru, feats).eval()
    torch.manual_seed(1)  # another seed: the rebuilt random tower differs until the weights load
    b = _model(gru, feats).eval()
    texts = ["a red circle", "blue star"]
    with torch.no_grad():
        assert not torch.allclose(a.encode_text(texts), b.encode_text(texts))
        load_weights(b, model_state(a), tmp_path / "model.safetensors")
        torch.testing.assert_close(a.encode_text(texts), b.encode_text(texts))


def _tiny_tokenizer() -> str:
    from xmodal.models.text.bigru import train_tokenizer

    return train_tokenizer(["a red circle", "blue star", "green square"], vocab_size=50)
