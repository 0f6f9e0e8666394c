"""Encode a prepared split with a model and evaluate it with the streaming engine.

Only a model's encode / score methods are used here: embedding scorers are encoded once
per item and ranked by the engine; pair scorers go through block scoring (and, later,
two-stage re-ranking).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..models.base import EmbeddingScorer, PairScorer
from ..progress import track


@torch.inference_mode()
def encode_all(fn: Any, inputs: Any, n: int, batch_size: int = 256, description: str = "",
               progress: bool = False, device: str | torch.device = "cpu") -> torch.Tensor:
    """``fn(inputs(idx))`` over ``0..n-1`` in batches, concatenated on the CPU."""
    out = []
    for start in track(range(0, n, batch_size), description=description, enabled=progress):
        idx = np.arange(start, min(n, start + batch_size))
        out.append(fn(inputs(idx, device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def embed_split(model: EmbeddingScorer, split, batch_size: int = 256, progress: bool = False,
                device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    ds = split.dataset
    img = encode_all(model.encode_image, split.images, ds.num_images, batch_size, "encoding images", progress, device)
    txt = encode_all(model.encode_text, split.texts, ds.num_texts, batch_size, "encoding texts", progress, device)
    return img, txt


def evaluate_split(model: Any, split, *, protocol: str = "full", block_size: int = 1024,
                   batch_size: int = 256, progress: bool = False, device: str | torch.device = "cpu",
                   return_ranks: bool = False, rerank_k: int = 0,
                   first_stage: tuple[Any, Any] | None = None, rerank_fusion: float = 0.0) -> dict:
    """Metrics (the engine's keys) of ``model`` on a prepared split, plus timing.

    For a pair scorer, ``rerank_k > 0`` evaluates two-stage: ``first_stage`` =
    ``(image_emb, text_emb)`` over the split's items (e.g. :func:`embed_split` of an embedding
    model) shortlists, else the model's own ``first_stage_embeddings``; ``rerank_fusion = w``
    orders the shortlist by ``pair score + w * first-stage score``.
    """
    from .protocols import evaluate_embeddings

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        # pair scorers; and models that are both (ALADIN: matching embeddings, alignment head)
        # when a two-stage ranking is asked for
        if isinstance(model, PairScorer) and (rerank_k or not isinstance(model, EmbeddingScorer)):
            from .pairs import evaluate_pair_scorer

            result = evaluate_pair_scorer(model, split, protocol=protocol, block_size=block_size,
                                          batch_size=batch_size, progress=progress, device=device,
                                          return_ranks=return_ranks, rerank_k=rerank_k,
                                          first_stage=first_stage, rerank_fusion=rerank_fusion)
        else:
            if first_stage is not None:
                raise ConfigError(f"a first stage re-ranks pair scorers; {type(model).__name__} is an "
                                  "embedding model, evaluated exactly")
            img, txt = embed_split(model, split, batch_size, progress, device)
            result = {"metrics": evaluate_embeddings(img, txt, split.dataset.gt, protocol=protocol,
                                                     block_size=block_size)}
            if return_ranks:
                from .metrics import ranks_from_embeddings

                result["i2t_ranks"], result["t2i_ranks"] = ranks_from_embeddings(img, txt, split.dataset.gt,
                                                                                 block_size=block_size)
                result["image_emb"], result["text_emb"] = img, txt
    finally:
        model.train(was_training)
    result["seconds"] = time.perf_counter() - t0
    return result


def first_stage_for(first_model: EmbeddingScorer, first_split, split, *, batch_size: int = 256,
                    progress: bool = False, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of ``first_model`` over ``first_split`` to shortlist for a pair scorer on ``split``.

    Both are the same split prepared for each model; the items must line up one to one (the
    same images and captions in the same order), else a :class:`DataError` says which differ.
    """
    if not isinstance(first_model, EmbeddingScorer):
        raise ConfigError(f"first stage: {type(first_model).__name__} is not an embedding model "
                          "(a first stage must encode images and texts independently)")
    a, b = first_split.dataset, split.dataset
    for what, x, y in (("images", a.image_ids, b.image_ids), ("captions", a.text_ids, b.text_ids)):
        if len(x) != len(y) or any(p != q for p, q in zip(x, y)):
            raise DataError(f"first stage: its {a.name}/{a.split} {what} ({len(x)}) differ from the evaluated "
                            f"split's ({len(y)}); both models must read the same data")
    first_model.eval()
    with torch.inference_mode():
        return embed_split(first_model, first_split, batch_size, progress, device)
