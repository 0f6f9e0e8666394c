"""ALADIN's training step: the backbone once per side, then the heads its loss needs."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...models.aladin import Aladin
from ...models.base import TowerOutput
from .base import TASKS, split_terms


def _alignment_reps(model: Aladin, states: TowerOutput, side: str) -> TowerOutput:
    tokens, mask = model.alignment_tokens(states, side)  # (B, N', D), (B, N')
    return TowerOutput(tokens=tokens, pooled=states.pooled, mask=mask)


@TASKS.register("aladin")
class AladinTask(nn.Module):
    """Batch step of ALADIN: backbone once per side, then the heads the loss needs."""

    def __init__(self, model: Aladin, loss: nn.Module) -> None:
        super().__init__()
        if not hasattr(loss, "combine"):
            raise ConfigError(f"an ALADIN model trains with loss 'aladin', not {type(loss).__name__}")
        self.model = model
        self.loss = loss

    def training_step(self, batch: Any, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        m = self.model
        img, txt = m.image_states(batch.images), m.text_states(batch.texts)
        pos = batch.pos_mask.to(img.tokens.device)
        align = match = None
        if self.loss.needs_alignment:
            # only a teacher (distillation without the alignment term): no gradient needed
            with torch.set_grad_enabled(torch.is_grad_enabled() and "alignment" in self.loss.terms):
                align = m.alignment_scores(_alignment_reps(m, img, "image"), _alignment_reps(m, txt, "text"))  # (B_img, B_txt)
        if self.loss.needs_matching:
            match = m.matching_embedding(img) @ m.matching_embedding(txt).t()  # (B_img, B_txt)
        out = self.loss.combine(align, match, pos_mask=pos, step=step)
        return split_terms(out)


def _reps(model: Aladin, states: TowerOutput, side: str) -> TowerOutput:
    tokens, mask = model.alignment_tokens(states, side)
    return TowerOutput(tokens=tokens, pooled=states.pooled, mask=mask)
