"""The Vokenization sentence-level retrieval model: its head, its configs, a training smoke run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from train_fixtures import write_synthetic_precomp, write_tiny_config
from xmodal.config import load_config
from xmodal.errors import ConfigError
from xmodal.models import create_model
from xmodal.models.base import TowerOutput
from xmodal.models.heads.projection import ProjectionHead, VokenMLP
from xmodal.train.loop import train

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "xmodal" / "configs"


def test_voken_mlp_layer_structure_and_shapes():
    head = ProjectionHead(3072, 512, proj="voken_mlp", hidden_dim=1024, dropout=0.2)
    assert isinstance(head.proj, VokenMLP)
    layers = list(head.proj.layers)
    # Maria retrieval_model/xmatching/model.py: MLP(backbone_dim, [1024, 1024, dim]), dropout 0.2
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert [tuple(m.weight.shape) for m in layers if isinstance(m, nn.Linear)] == [(1024, 3072), (1024, 1024),
                                                                                   (512, 1024)]
    assert all(m.p == 0.2 for m in layers if isinstance(m, nn.Dropout))
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) for m in head.modules())
    head.eval()
    out = head(TowerOutput(tokens=torch.zeros(5, 1, 3072), pooled=torch.randn(5, 3072), mask=None))
    assert out.shape == (5, 512)


def _set(linear: nn.Linear, w: list, b: list) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(w, dtype=torch.float))
        linear.bias.copy_(torch.tensor(b, dtype=torch.float))


def test_voken_mlp_golden_output():
    mlp = VokenMLP(2, 2, 2, dropout=0.2).eval()
    lin1, lin2, lin3 = (m for m in mlp.layers if isinstance(m, nn.Linear))
    _set(lin1, [[1, -1], [2, 0]], [0, -1])
    _set(lin2, [[1, 1], [-1, 2]], [0.5, 0])
    _set(lin3, [[1, 0], [1, -1]], [0, 1])
    x = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    # by hand, row 1: [-1, 1] -> relu [0, 1] -> [1.5, 2] -> relu [1.5, 2] -> [1.5, 0.5]
    # row 2: [-1, -1] -> relu [0, 0] -> [0.5, 0] -> relu [0.5, 0] -> [0.5, 1.5]
    expected = torch.tensor([[1.5, 0.5], [0.5, 1.5]])
    torch.testing.assert_close(mlp(x), expected)
    # train mode: dropout is active between the layers (inverted dropout scales by 1/(1-p))
    mlp.train()
    torch.manual_seed(0)
    outs = {tuple(mlp(x[:1]).flatten().tolist()) for _ in range(50)}
    assert len(outs) > 1


def test_voken_mlp_through_dual_encoder_is_l2_normalised():
    from xmodal.models.dual import DualEncoder

    class Stub(nn.Module):
        output_dim = 2

    model = DualEncoder(Stub(), Stub(), 2, dict(proj="voken_mlp", hidden_dim=2),
                        dict(proj="voken_mlp", hidden_dim=2)).eval()
    lin1, lin2, lin3 = (m for m in model.text_head.proj.layers if isinstance(m, nn.Linear))
    _set(lin1, [[1, -1], [2, 0]], [0, -1])
    _set(lin2, [[1, 1], [-1, 2]], [0.5, 0])
    _set(lin3, [[1, 0], [1, -1]], [0, 1])
    feats = TowerOutput(tokens=torch.zeros(1, 1, 2), pooled=torch.tensor([[1.0, 2.0]]), mask=None)
    emb = model.encode_text(feats)
    torch.testing.assert_close(emb, torch.tensor([[1.5, 0.5]]) / math.sqrt(2.5))


def test_unknown_projection_lists_voken_mlp():
    with pytest.raises(ConfigError, match="voken_mlp"):
        ProjectionHead(4, 4, proj="voken")


def test_emoji_vokenization_config_builds():
    cfg = load_config(CONFIGS / "emoji" / "vokenization.yaml")
    assert cfg.loss.name == "hinge" and cfg.loss.args == {"margin": 0.5, "max_violation": False, "reduction": "sum"}
    assert cfg.optim.name == "adam" and cfg.optim.schedule == "constant" and cfg.optim.grad_clip == 5.0
    model = create_model(cfg.model).eval()
    assert model.embed_dim == 512
    assert model.text_tower.output_dim == 4 * 384  # MiniLM: CLS of the last 4 layers, concatenated
    assert model.image_tower.output_dim == 1280
    assert model.frozen_image and model.frozen_text
    assert not any(p.requires_grad for p in model.text_tower.parameters())
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    for head, in_dim in ((model.text_head, 1536), (model.image_head, 1280)):
        lins = [m for m in head.proj.layers if isinstance(m, nn.Linear)]
        assert [tuple(m.weight.shape) for m in lins] == [(1024, in_dim), (1024, 1024), (512, 1024)]
    texts = ["a red heart", "a smiling face with sunglasses"]
    with torch.no_grad():
        feats = model.text_features(texts)
        emb = model.encode_text(texts)
        hf = model.text_tower.model(**model.text_tower.tokenize(texts), output_hidden_states=True)
    assert feats.pooled.shape == (2, 1536)
    # the sentence vector is the CLS token of layers -4..-1 (oldest first), as sorted([-4,-3,-2,-1])
    want = torch.cat([hf.hidden_states[i][:, 0] for i in (-4, -3, -2, -1)], dim=-1)
    torch.testing.assert_close(feats.pooled, want)
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        img = model.encode_image(torch.zeros(1, 3, 160, 160, dtype=torch.uint8))
    assert img.shape == (1, 512)


def test_vokenization_base_config():
    cfg = load_config(CONFIGS / "vokenization_base.yaml")
    m = cfg.model
    assert m.embed_dim == 512
    assert m.text.name == "hf" and m.text.frozen
    assert m.text.args["name_or_path"] == "bert-base-uncased"
    assert m.text.args["pooling"] == "cls" and m.text.args["cls_last_k"] == 4 and m.text.args["max_length"] == 75
    assert m.image.name == "hf_vision" and m.image.frozen
    for h in (m.image_head, m.text_head):
        assert (h.input, h.proj, h.hidden_dim, h.dropout) == ("pooled", "voken_mlp", 1024, 0.2)
    assert cfg.loss.args["margin"] == 0.5 and cfg.train.batch_size == 512 and cfg.optim.lr == 1e-3


def test_voken_heads_train_on_synthetic_data(tmp_path):
    data = write_synthetic_precomp(tmp_path / "precomp")
    cfg = load_config(write_tiny_config(tmp_path / "tiny.yaml", data, steps=120), [
        "model.image_head.proj=voken_mlp", "model.text_head.proj=voken_mlp",
        "model.image_head.hidden_dim=64", "model.text_head.hidden_dim=64",
        "model.image_head.dropout=0.2", "model.text_head.dropout=0.2",
        "loss.args.margin=0.5", "optim.grad_clip=5.0", "optim.lr=0.005", "loss.args.reduction=mean",
    ])
    summary = train(cfg, tmp_path / "run", progress=False)
    best = json.loads((tmp_path / "run" / "best" / "state.json").read_text())
    assert summary["best_step"] == best["step"]
    # 40 validation images, 2 captions each: chance rsum is 2 * (1 + 5 + 10) / 40 * 100 = 80
    assert best["metrics"]["rsum"] > 250
