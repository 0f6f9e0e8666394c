"""Transformer encoder blocks: attention, layers, token embeddings, BERT weight loading.

Reused by the two-stream ALADIN backbone (image tokens and word tokens encoded separately
by one set of layers) and by single-stream cross-encoders (both in one sequence).

- :class:`MultiHeadSelfAttention` runs :func:`torch.nn.functional.scaled_dot_product_attention`
  unless the attention maps are asked for, then computes them explicitly.
- :class:`TransformerLayer` is post-LN (BERT, ``nn.TransformerEncoderLayer``'s default) or
  pre-LN (``norm_first=True``, GPT-2 / ViT); :class:`TransformerEncoder` stacks them (with a
  final LayerNorm when pre-LN) and takes a padding mask ``(B, N)``, True = real token.
- :class:`TextEmbeddings` (word + position + token type, LayerNorm) and
  :class:`ImageEmbeddings` (region / grid features plus box features, LayerNorm; Oscar's
  ``img_embedding``). :func:`grid_boxes` gives grid cells the 6 box values VinVL regions
  carry (``x1, y1, x2, y2, w, h``, normalised), so grid and region tokens look alike.
- :func:`load_bert` builds embeddings + encoder from a Hugging Face BERT-type checkpoint
  (BERT, MiniLM, Oscar / VinVL) and copies its weights; the result reproduces the original
  model's hidden states.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, XmodalError

log = logging.getLogger(__name__)

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def _check_activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"transformer: activation must be one of {', '.join(_ACTIVATIONS)}, got {name!r}")
    return name


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask; optionally returns the maps."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"transformer: dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (B, N, D), ``mask`` (B, N) True = real -> ``(out (B, N, D), attn (B, H, N, N) or None)``.

        Padded keys get no weight; padded queries still produce (meaningless) outputs,
        which callers mask.
        """
        B, N, D = x.shape
        H = self.heads
        q = self.query(x).view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, Dh)
        k = self.key(x).view(B, N, H, D // H).transpose(1, 2)
        v = self.value(x).view(B, N, H, D // H).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        keep = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N) broadcast over heads, queries
        if need_weights:
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(D // H)  # (B, H, N, N)
            if keep is not None:
                logits = logits.masked_fill(~keep, float("-inf"))
            attn = torch.softmax(logits, dim=-1)
            ctx = F.dropout(attn, p, self.training) @ v  # (B, H, N, Dh)
        else:
            attn = None
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        ctx = ctx.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.out(ctx), attn


class TransformerLayer(nn.Module):
    """Self-attention + feed-forward block, post-LN (default) or pre-LN (``norm_first``)."""

    def __init__(self, dim: int, heads: int, ff_dim: int | None = None, dropout: float = 0.1,
                 activation: str = "gelu", norm_first: bool = False, eps: float = 1e-12) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.act = _ACTIVATIONS[_check_activation(activation)]
        self.attn = MultiHeadSelfAttention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.ff_in = nn.Linear(dim, ff_dim or 4 * dim)
        self.ff_out = nn.Linear(ff_dim or 4 * dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff_out(self.drop(self.act(self.ff_in(x))))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.norm_first:
            a, attn = self.attn(self.norm1(x), mask, need_weights)
            x = x + self.drop(a)
            x = x + self.drop(self._ff(self.norm2(x)))
        else:
            a, attn = self.attn(x, mask, need_weights)
            x = self.norm1(x + self.drop(a))
            x = self.norm2(x + self.drop(self._ff(x)))
        return x, attn


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerLayer` (+ a final LayerNorm when pre-LN)."""

    def __init__(self, dim: int, depth: int, heads: int, ff_dim: int | None = None, dropout: float = 0.1,
                 activation: str = "gelu", norm_first: bool = False, eps: float = 1e-12) -> None:
        super().__init__()
        if depth < 0:
            raise ConfigError(f"transformer: depth must be >= 0, got {depth}")
        self.dim, self.depth, self.heads = dim, depth, heads
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, ff_dim, dropout, activation, norm_first, eps)
                                    for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, eps=eps) if norm_first and depth else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                return_attentions: bool = False) -> Any:
        """``x`` (B, N, D), ``mask`` (B, N) True = real -> ``x`` (B, N, D); with
        ``return_attentions`` also the list of per-layer maps (B, H, N, N)."""
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: the unmasked attention kernels are faster
        maps = []
        for layer in self.layers:
            x, attn = layer(x, mask, return_attentions)
            maps.append(attn)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return (x, maps) if return_attentions else x


class TextEmbeddings(nn.Module):
    """BERT's input embeddings: word + absolute position + token type, LayerNorm, dropout."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int = 512, type_vocab: int = 2,
                 dropout: float = 0.1, eps: float = 1e-12) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_positions, dim)
        self.token_type = nn.Embedding(type_vocab, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, L = input_ids.shape
        if L > self.position.num_embeddings:
            raise XmodalError(f"text of {L} tokens exceeds the {self.position.num_embeddings} positions")
        pos = torch.arange(L, device=input_ids.device)[None]  # (1, L)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.position(pos) + self.token_type(types)  # (B, L, D)
        return self.drop(self.norm(x))


class ImageEmbeddings(nn.Module):
    """Region / grid features + box features -> tokens: ``LN(W_f f + W_b b)``, dropout.

    One linear map of the concatenation ``[f, b]`` (Oscar's ``img_embedding`` over 2048 + 6
    values), kept as two so that grid tokens and region tokens share the code.
    """

    def __init__(self, feat_dim: int, dim: int, box_dim: int = 6, dropout: float = 0.1, eps: float = 1e-12) -> None:
        super().__init__()
        self.feat_dim, self.box_dim = feat_dim, box_dim
        self.feat = nn.Linear(feat_dim, dim)
        self.box = nn.Linear(box_dim, dim, bias=False) if box_dim else None
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        if feats.shape[-1] != self.feat_dim:
            raise XmodalError(f"image features are {feats.shape[-1]}-d, the model expects {self.feat_dim}")
        x = self.feat(feats)  # (B, R, D)
        if self.box is not None:
            if boxes is None or boxes.shape[-1] != self.box_dim:
                got = None if boxes is None else boxes.shape[-1]
                raise XmodalError(f"image tokens need {self.box_dim} box values each, got {got}")
            x = x + self.box(boxes.to(x.dtype))
        return self.drop(self.norm(x))


def grid_boxes(height: int, width: int, device: Any = None) -> torch.Tensor:
    """``(height * width, 6)`` boxes ``x1, y1, x2, y2, w, h`` (normalised) of a grid's cells,
    row-major (the order of ``feature_map.flatten(2)``)."""
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    y, x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    x1, y1 = (x / width).flatten(), (y / height).flatten()
    w = torch.full_like(x1, 1.0 / width)
    h = torch.full_like(y1, 1.0 / height)
    return torch.stack([x1, y1, x1 + w, y1 + h, w, h], dim=1)  # (H*W, 6)


# ------------------------------------------------------------------------------------------
# BERT-type checkpoints
# ------------------------------------------------------------------------------------------
def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint folder: safetensors, else ``pytorch_model.bin`` (weights only)."""
    st = path / "model.safetensors"
    if st.exists():
        from safetensors.torch import load_file

        return load_file(str(st))
    binary = path / "pytorch_model.bin"
    if binary.exists():
        try:
            return torch.load(str(binary), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickles with code are refused by weights_only
            raise XmodalError(f"{binary}: cannot read as plain tensors ({exc})") from None
    raise XmodalError(f"{path}: no model.safetensors or pytorch_model.bin")


def bert_prefix(state: dict[str, torch.Tensor]) -> str:
    """'' for BertModel files, 'bert.' for task heads (Oscar/VinVL ``ImageBertFor...``)."""
    for prefix in ("", "bert.", "model."):
        if f"{prefix}embeddings.word_embeddings.weight" in state:
            return prefix
    raise XmodalError("not a BERT-type checkpoint: no embeddings.word_embeddings.weight")


def resolve_bert_path(name_or_path: str | None) -> str:
    """``None`` / ``minilm`` -> the bundled MiniLM; a folder; or a Hub name in the local cache."""
    from .text.hf import resolve_model_path

    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - not cached, no hub client, ...
        raise ConfigError(f"BERT checkpoint {name_or_path!r}: not a folder and not in the local Hugging Face "
                          f"cache ({type(exc).__name__}); download it once or pass a folder") from None


def load_bert(name_or_path: str | None, dropout: float | None = None) -> dict[str, Any]:
    """Embeddings, encoder and tokenizer of a BERT-type checkpoint, with its weights.

    Returns ``{"embeddings": TextEmbeddings, "encoder": TransformerEncoder, "tokenizer",
    "config", "image": {"weight", "bias", "norm_weight", "norm_bias"} or None}`` where
    ``image`` holds Oscar's image embedding when the checkpoint has one.
    """
    import json

    from transformers import AutoTokenizer

    path = Path(resolve_bert_path(name_or_path))
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise XmodalError(f"{path / 'config.json'}: cannot read ({exc})") from None
    dim, depth, heads = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    act = config.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{path}: hidden_act {act!r} is not supported (gelu, relu)")
    eps = float(config.get("layer_norm_eps", 1e-12))
    p = float(config.get("hidden_dropout_prob", 0.1)) if dropout is None else float(dropout)
    emb = TextEmbeddings(int(config["vocab_size"]), dim, int(config.get("max_position_embeddings", 512)),
                         int(config.get("type_vocab_size", 2)), p, eps)
    enc = TransformerEncoder(dim, depth, heads, int(config["intermediate_size"]), p, act, False, eps)
    state = read_state(path)
    pre = bert_prefix(state)
    mapping = {
        "word.weight": "embeddings.word_embeddings.weight",
        "position.weight": "embeddings.position_embeddings.weight",
        "token_type.weight": "embeddings.token_type_embeddings.weight",
        "norm.weight": "embeddings.LayerNorm.weight",
        "norm.bias": "embeddings.LayerNorm.bias",
    }
    _copy(emb, {k: state[pre + v] for k, v in mapping.items()}, path)
    layer_map = {
        "attn.query": "attention.self.query", "attn.key": "attention.self.key",
        "attn.value": "attention.self.value", "attn.out": "attention.output.dense",
        "norm1": "attention.output.LayerNorm", "ff_in": "intermediate.dense",
        "ff_out": "output.dense", "norm2": "output.LayerNorm",
    }
    enc_state = {}
    for i in range(depth):
        for ours, theirs in layer_map.items():
            for leaf in ("weight", "bias"):
                key = f"{pre}encoder.layer.{i}.{theirs}.{leaf}"
                if key not in state:
                    raise XmodalError(f"{path}: checkpoint lacks {key}")
                enc_state[f"layers.{i}.{ours}.{leaf}"] = state[key]
    _copy(enc, enc_state, path)
    image = None
    if f"{pre}img_embedding.weight" in state:  # Oscar / VinVL
        image = {"weight": state[f"{pre}img_embedding.weight"], "bias": state[f"{pre}img_embedding.bias"],
                 "norm_weight": state.get(f"{pre}LayerNorm.weight"), "norm_bias": state.get(f"{pre}LayerNorm.bias")}
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    log.debug("loaded BERT-type %s: %d layers, %d-d, %d heads", path, depth, dim, heads)
    return {"embeddings": emb, "encoder": enc, "tokenizer": tokenizer, "config": config, "image": image,
            "path": str(path)}


def _copy(module: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    own = module.state_dict()
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise XmodalError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    module.load_state_dict(tensors, strict=True)


def image_token_inputs(images: Any, tower: Any, device: Any, *, run_tower_with_grad: bool, box_dim: int,
                       grid: Any, who: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Image tokens for a transformer over regions or grid cells, from whatever a split feeds.

    ``images``: feature rows (a dict with ``features`` and optional ``boxes``/``mask``, as VinVL
    and precomp readers give), cached tower outputs (:class:`TowerOutput`), a tensor of feature
    rows, or pixels for ``tower``. Returns ``(features (B, R, F), boxes (B, R, 6) or None,
    mask (B, R) or None)`` on ``device``; without boxes and with ``box_dim``, the tokens are a
    ``grid`` (default: square) and get their cells' boxes.
    """
    from .base import TowerOutput

    boxes = mask = None
    pixels = tower is not None and getattr(tower, "input_kind", None) == "pixels"
    if isinstance(images, dict):  # feature rows (VinVL regions + boxes)
        feats, boxes, mask = images["features"], images.get("boxes"), images.get("mask")
        if mask is None:
            mask = feats.abs().sum(-1) > 0  # padded region rows are zero
    elif isinstance(images, TowerOutput):
        feats, mask = images.tokens, images.mask
    elif isinstance(images, torch.Tensor) and images.dim() in (2, 3) and not pixels:
        feats = images  # feature rows without boxes (precomp)
    else:
        if tower is None:
            raise XmodalError(f"{who} has no image tower: pass region features or cached tokens")
        with torch.set_grad_enabled(torch.is_grad_enabled() and run_tower_with_grad):
            out = tower(images.to(device) if torch.is_tensor(images) else images)
        feats, mask = out.tokens, out.mask
    feats = feats.to(device).float()
    if feats.dim() == 2:
        feats = feats[:, None]  # (B, 1, F) a pooled vector as one token
    if boxes is None and box_dim:
        n = feats.shape[1]
        h, w = grid or (math.isqrt(n), math.isqrt(n))
        if h * w != n:
            raise ConfigError(f"{who}: {n} image tokens without boxes are not a square grid; "
                              f"set model.args.grid: [height, width] or box_dim: 0")
        boxes = grid_boxes(h, w, device)[None].expand(feats.shape[0], -1, -1)  # (B, R, 6)
    if boxes is not None:
        boxes = boxes.to(device).float()
    if mask is not None:
        mask = mask.to(device).bool()
    return feats, boxes, mask
