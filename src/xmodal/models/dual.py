"""Dual encoder: an image tower and a text tower, each followed by a projection head.

This is the embedding scorer of the toolkit (OpenCLIP-style models, the sentence-level
retrieval model of the Vokenization line, the training-core baseline). A frozen tower is
run once over the data and its outputs are cached by the trainer; training then feeds
:class:`TowerOutput` features straight to the heads (:meth:`embed_image` /
:meth:`embed_text`), while inference on raw inputs goes through the towers
(:meth:`encode_image` / :meth:`encode_text`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import IMAGE_TOWERS, TEXT_TOWERS, EmbeddingScorer, TowerOutput
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


class DualEncoder(EmbeddingScorer):
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

    def train(self, mode: bool = True) -> "DualEncoder":
        super().train(mode)
        # frozen towers stay in eval mode (BatchNorm statistics, dropout off)
        if self.frozen_image:
            self.image_tower.eval()
        if self.frozen_text:
            self.text_tower.eval()
        return self

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

    def frozen_prefixes(self) -> list[str]:
        """State-dict prefixes not saved in checkpoints: rebuilt from their own weights."""
        out = []
        if self.frozen_image:
            out.append("image_tower.")
        if self.frozen_text:
            out.append("text_tower.")
        return out
