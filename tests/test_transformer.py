"""Transformer blocks: attention paths agree, masks hold, BERT weights reproduce the original."""
from __future__ import annotations

import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.models.transformer import (ImageEmbeddings, MultiHeadSelfAttention, TransformerEncoder, grid_boxes,
                                       load_bert)


def _padded(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return x, mask


def test_sdpa_and_explicit_attention_agree_and_maps_respect_padding():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(16, 4).eval()
    x, mask = _padded()
    with torch.no_grad():
        fast, none = attn(x, mask)
        slow, maps = attn(x, mask, need_weights=True)
    assert none is None and maps.shape == (3, 4, 5, 5)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 4, 5))
    assert float(maps[1, :, :, 3:].abs().sum()) == 0.0  # padded keys get no weight
    assert float(maps[2, :, :, 1:].abs().sum()) == 0.0


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    enc = TransformerEncoder(16, 2, 4, 32, dropout=0.0).eval()
    x, mask = _padded()
    with torch.no_grad():
        full = enc(x, mask)
        alone = enc(x[1:2, :3])  # the same item without its padding
    torch.testing.assert_close(full[1:2, :3], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_forward_backward_and_attention_maps(norm_first):
    torch.manual_seed(0)
    enc = TransformerEncoder(16, 3, 4, dropout=0.1, norm_first=norm_first, activation="relu")
    assert (enc.final_norm is not None) == norm_first
    x, mask = _padded()
    x.requires_grad_(True)
    out, maps = enc(x, mask, return_attentions=True)
    assert out.shape == x.shape and len(maps) == 3 and maps[0].shape == (3, 4, 5, 5)
    out[mask].sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in enc.parameters())


def test_config_errors():
    with pytest.raises(ConfigError, match="divisible"):
        MultiHeadSelfAttention(10, 4)
    with pytest.raises(ConfigError, match="activation"):
        TransformerEncoder(16, 1, 4, activation="swish")


def test_grid_boxes_golden():
    b = grid_boxes(2, 2)
    expected = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5, 0.5, 0.5],
                             [0.0, 0.5, 0.5, 1.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0, 0.5, 0.5]])
    torch.testing.assert_close(b, expected)
    assert grid_boxes(5, 5).shape == (25, 6)


def test_image_embeddings_use_boxes():
    torch.manual_seed(0)
    emb = ImageEmbeddings(8, 16, box_dim=6, dropout=0.0).eval()
    feats = torch.randn(2, 4, 8)
    boxes = grid_boxes(2, 2)[None].expand(2, -1, -1)
    a = emb(feats, boxes)
    b = emb(feats, boxes.flip(1))  # same features, other positions
    assert a.shape == (2, 4, 16) and not torch.allclose(a, b)


def test_load_bert_reproduces_minilm():
    from transformers import AutoModel

    bert = load_bert("minilm", dropout=0.0)
    ref = AutoModel.from_pretrained(bert["path"], local_files_only=True).eval()
    batch = bert["tokenizer"](["a grinning face", "red heart on a white background"], padding=True,
                              return_tensors="pt")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        want = ref(**batch).last_hidden_state
        emb, enc = bert["embeddings"].eval(), bert["encoder"].eval()
        got = enc(emb(batch["input_ids"], batch["token_type_ids"]), mask)
    assert enc.depth == 6 and enc.dim == 384
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-4)
    assert bert["image"] is None  # MiniLM has no Oscar image embedding
