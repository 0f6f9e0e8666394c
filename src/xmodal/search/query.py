"""Searching an index: encode queries with the index's model, top-k, optional re-ranking.

* :func:`search_text` / :func:`search_image` answer one query as a list of result dicts.
* :func:`encode_text_queries` / :func:`encode_image_queries` are the query encoders (the
  server batches them).
* :func:`result_label` names a result for people: its caption, its image's first caption
  (stored at index time), or its file or emoji name.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import XmodalError, where
from ..index import MAX_K, Index
from ..index.build import EMOJI_MARK
from ..models.base import pixel_tower
from ..models.run import as_model
from .rerank import Reranker

log = logging.getLogger(__name__)


def check_k(k: Any, index: Index) -> int:
    """``k`` as an int in ``1..MAX_K``, capped at the index size."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise XmodalError(f"-k {k!r}: must be an integer between 1 and {MAX_K}")
    if len(index) == 0:
        raise XmodalError(f"{where(index.path)}the index is empty")
    return int(min(k, len(index)))


@lru_cache(maxsize=4)
def _emoji_names(asset: str) -> dict[str, str]:
    """``{"<style>/<unified lower>": English label}`` of an emoji pack (for indexes built before
    image captions were stored)."""
    from ..data import emoji

    try:
        pack = emoji.open_pack(asset or "emoji")
        lang = "en" if "en" in pack.languages else pack.languages[0]
        labels = pack.meta["text"][lang]["label"]
    except (XmodalError, OSError, KeyError, IndexError, TypeError) as e:
        log.debug("no emoji names from %s: %s", asset, e)
        return {}
    return {f"{style}/{u.lower()}": labels[c] for c, u in enumerate(pack.unified) for style in pack.styles}


def result_label(meta: dict[str, Any], id_: str = "") -> str:
    """A short name for an index row, for people: a caption row's text, an image's first stored
    caption (``captions``), the name of an emoji (looked up in its pack when the index predates
    stored captions) or image file, else its dataset id or row id."""
    caps = meta.get("captions")
    if isinstance(caps, list) and caps and isinstance(caps[0], str):
        return caps[0]
    if isinstance(meta.get("caption"), str) and meta["caption"]:
        return meta["caption"]
    path = meta.get("path")
    if isinstance(path, str) and path:
        if EMOJI_MARK not in path:
            return Path(path).name
        asset, _, image_id = path.partition(EMOJI_MARK)
        name = _emoji_names(asset.rstrip("/\\")).get(image_id.lower())
        if name:
            return name
    return str(meta.get("image_id") or meta.get("text_id") or id_)


def _results(index: Index, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
    out = []
    keep = rows >= 0
    ids = index.ids_of(rows[keep])
    metas = index.metadata(rows[keep])
    for rank, (score, id_, meta) in enumerate(zip(scores[keep].tolist(), ids, metas), 1):
        rec = {"rank": rank, "score": round(float(score), 6), "id": id_, "label": result_label(meta, id_)}
        rec.update({k: v for k, v in meta.items() if k not in rec})
        out.append(rec)
    return out


@torch.inference_mode()
def encode_text_queries(run: Any, texts: list[str]) -> np.ndarray:
    """Float32 (Q, D) L2-normalised text embeddings (``run``: a :class:`Run` or an embedding model)."""
    model = as_model(run)
    return model.encode_text(list(texts)).float().cpu().numpy()


@torch.inference_mode()
def encode_image_queries(run: Any, paths: list[str | os.PathLike]) -> np.ndarray:
    """Float32 (Q, D) image embeddings of image files (loaded with :func:`open_image`)."""
    model = as_model(run)
    from ..data.images import open_image

    tower = pixel_tower(model, "an image query")
    pixels = torch.stack([tower.preprocess(open_image(p)) for p in paths])  # (Q, 3, H, W)
    return model.encode_image(pixels).float().cpu().numpy()


def search_text(index: Index, run: Any, text: str, k: int = 10,
                reranker: Reranker | None = None) -> list[dict[str, Any]]:
    """Top-``k`` rows of ``index`` for one text query (``run``: the index's :class:`Run`): ``[{"rank", "score", "id", **metadata}]``.

    With a ``reranker``, its pair scorer re-orders the index's top ``reranker.k`` and the
    scores are the pair scorer's (plus ``reranker.fusion`` x the index's).
    """
    if not isinstance(text, str) or not text.strip():
        raise XmodalError("empty query: give some text (or --image PATH)")
    k = check_k(k, index)
    n = reranker.shortlist_size(k, index) if reranker is not None else k
    scores, rows = index.search(encode_text_queries(run, [text.strip()]), n)
    if reranker is not None:
        s, r = reranker.rerank(index, text.strip(), "text", rows[0], k, first_scores=scores[0])
        return _results(index, s, r)
    return _results(index, scores[0], rows[0])


def search_image(index: Index, run: Any, image: str | os.PathLike, k: int = 10,
                 reranker: Reranker | None = None) -> list[dict[str, Any]]:
    """Top-``k`` rows of ``index`` for one image file (re-ranked as in :func:`search_text`)."""
    k = check_k(k, index)
    n = reranker.shortlist_size(k, index) if reranker is not None else k
    scores, rows = index.search(encode_image_queries(run, [image]), n)
    if reranker is not None:
        s, r = reranker.rerank(index, image, "image", rows[0], k, first_scores=scores[0])
        return _results(index, s, r)
    return _results(index, scores[0], rows[0])
