"""Dual encoder: an image tower and a text tower, each followed by a projection head.

This is the embedding scorer of the toolkit (OpenCLIP-style models, the sentence-level
retrieval model of the Vokenization line, the training-core baseline). A frozen tower is
run once over the data and its outputs are cached by the trainer; training then feeds
:class:`TowerOutput` features straight to the heads (:meth:`embed_image` /
:meth:`embed_text`), while inference on raw inputs goes through the towers
(:meth:`encode_image` / :meth:`encode_text`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import (IMAGE_TOWERS, MODEL_ARGS, MODELS, TEXT_TOWERS, EmbeddingScorer, FrozenTowers, TowerOutput,
                   parse_model_args)
from .heads.projection import ProjectionHead


def build_towers(cfg) -> tuple[nn.Module, nn.Module]:
    """Create the image and text towers named in a :class:`xmodal.config.ModelConfig`."""
    from . import image as _image  # noqa: F401  (registers image towers)
    from . import text as _text  # noqa: F401  (registers text towers)

    image = IMAGE_TOWERS.create(cfg.image.name, **cfg.image.args)
    text = TEXT_TOWERS.create(cfg.text.name, **cfg.text.args)
    for tower, tcfg in ((image, cfg.image), (text, cfg.text)):
        if tcfg.frozen:
            tower.requires_grad_(False)
            tower.eval()
    return image, text


class DualEncoder(FrozenTowers, EmbeddingScorer):
    """Two towers + two projection heads into one ``embed_dim`` space (L2-normalised)."""

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, embed_dim: int,
                 image_head: dict | None = None, text_head: dict | None = None,
                 frozen_image: bool = True, frozen_text: bool = True) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.frozen_image = frozen_image
        self.frozen_text = frozen_text
        self.embed_dim = embed_dim
        self.image_head = ProjectionHead(image_tower.output_dim, embed_dim, **(image_head or {}))
        self.text_head = ProjectionHead(text_tower.output_dim, embed_dim, **(text_head or {}))

    # towers -------------------------------------------------------------------------
    def image_features(self, images: Any) -> TowerOutput:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_image):
            return self.image_tower(images)

    def text_features(self, texts: Sequence[str] | dict) -> TowerOutput:
        batch = self.text_tower.tokenize(list(texts)) if not isinstance(texts, dict) else texts
        device = next(iter(self.state_dict().values())).device
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_text):
            return self.text_tower(batch)

    # heads --------------------------------------------------------------------------
    def embed_image(self, feats: TowerOutput, normalize: bool = True) -> torch.Tensor:
        x = self.image_head(feats)  # (B, embed_dim)
        return F.normalize(x, dim=-1) if normalize else x

    def embed_text(self, feats: TowerOutput, normalize: bool = True) -> torch.Tensor:
        x = self.text_head(feats)  # (B, embed_dim)
        return F.normalize(x, dim=-1) if normalize else x

    # public encoders ----------------------------------------------------------------
    def encode_image(self, images: Any, normalize: bool = True) -> torch.Tensor:
        feats = images if isinstance(images, TowerOutput) else self.image_features(images)
        return self.embed_image(feats, normalize)

    def encode_text(self, texts: Any, normalize: bool = True) -> torch.Tensor:
        feats = texts if isinstance(texts, TowerOutput) else self.text_features(texts)
        return self.embed_text(feats, normalize)


@dataclass(frozen=True)
class DualEncoderArgs:
    """``model.args`` of ``type: dual_encoder``: none (the towers and heads have their own
    sections, ``model.image`` / ``model.text`` / ``model.image_head`` / ``model.text_head``)."""


MODEL_ARGS["dual_encoder"] = DualEncoderArgs


@MODELS.register("dual_encoder")
def _build(cfg: Any) -> DualEncoder:
    parse_model_args(DualEncoderArgs, cfg.args, "dual_encoder")  # refuses any key, naming it
    image, text = build_towers(cfg)

    def head(h: Any) -> dict:
        return dict(input=h.input, pooling=h.pooling, pooling_args=h.pooling_args, proj=h.proj,
                    hidden_dim=h.hidden_dim, dropout=h.dropout)

    return DualEncoder(image, text, cfg.embed_dim, head(cfg.image_head), head(cfg.text_head),
                       frozen_image=cfg.image.frozen, frozen_text=cfg.text.frozen)
