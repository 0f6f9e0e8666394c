"""Re-ranking an index's shortlist with a pair scorer (the second stage of two-stage search)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, XmodalError, where
from ..eval.pairs import check_fusion, concat_reps, fuse_scores, take_reps
from ..index import MAX_K, Index
from ..index.build import open_indexed_image
from ..models.base import PairScorer, pixel_tower
from ..models.run import Run


def _pixels(model: Any, paths: list[Any], what: str) -> torch.Tensor:
    tower = pixel_tower(model, what)
    return torch.stack([tower.preprocess(open_indexed_image(str(p))) for p in paths])  # (N, 3, H, W)


class Reranker:
    """A pair scorer (ADAPT, ALADIN's alignment head, a cross-encoder) re-scoring an index's
    shortlist: the index's embedding model finds the top ``k`` candidates, the pair scorer
    scores each (query, candidate) pair and orders them; the two-stage ranking of
    :func:`xmodal.eval.pairs.two_stage_ranks`, for one query.

    Candidates are re-encoded from the index's metadata (an image index needs ``path``, a text
    index ``caption``); their representations are kept in an LRU cache of ``cache_items``
    rows, so a server pays the encoding once per popular candidate. ``fusion = w`` orders by
    ``pair score + w x index score`` (default: the re-ranker run's ``eval.rerank_fusion``).
    """

    def __init__(self, run: Any, k: int = 100, cache_items: int = 4096, fusion: float | None = None) -> None:
        model = run.model if isinstance(run, Run) else run
        if not isinstance(model, PairScorer):
            raise ConfigError(f"re-ranker: {type(model).__name__} is not a pair scorer "
                              "(an embedding model's order is the index's own)")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise XmodalError(f"--rerank-k {k!r}: must be an integer between 1 and {MAX_K}")
        self.model = model.eval()
        self.k = int(k)
        if fusion is None:  # the run's own setting (eval.rerank_fusion), as xmodal eval uses it
            fusion = run.config.eval.rerank_fusion if isinstance(run, Run) else 0.0
        self.fusion = check_fusion(fusion, "--rerank-fusion")
        self.cache_items = int(cache_items)
        self._cache: "OrderedDict[tuple[str, int], Any]" = OrderedDict()

    def shortlist_size(self, k: int, index: Index) -> int:
        """Rows to fetch from the index for ``k`` results (at least ``k``)."""
        return int(min(max(self.k, k), len(index)))

    def _candidate_reps(self, index: Index, rows: np.ndarray) -> Any:
        key = str(index.path)
        missing = [int(r) for r in rows.tolist() if (key, int(r)) not in self._cache]
        if missing:
            metas = index.metadata(np.asarray(missing, dtype=np.int64))
            if index.modality == "image":
                paths = []
                for row, m in zip(missing, metas):
                    if not m.get("path"):
                        raise XmodalError(f"{where(index.path)}row {row} has no image path: re-ranking "
                                          "re-encodes the shortlisted images, so the index must name their files")
                    paths.append(m["path"])
                reps = self.model.encode_image_reps(_pixels(self.model, paths, "re-ranking"))
            else:
                caps = []
                for row, m in zip(missing, metas):
                    if not m.get("caption"):
                        raise XmodalError(f"{where(index.path)}row {row} has no caption to re-rank")
                    caps.append(m["caption"])
                reps = self.model.encode_text_reps(caps)
            for j, row in enumerate(missing):
                self._cache[(key, row)] = take_reps(reps, slice(j, j + 1))
        parts = []
        for r in rows.tolist():
            self._cache.move_to_end((key, int(r)))
            parts.append(self._cache[(key, int(r))])
        while len(self._cache) > self.cache_items:
            self._cache.popitem(last=False)
        return concat_reps(parts)

    @torch.inference_mode()
    def rerank(self, index: Index, query: Any, modality: str, rows: np.ndarray, k: int,
               first_scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Re-score the shortlist ``rows`` (one query's, ``-1`` = padding) and keep the top ``k``.

        ``query`` is a text (``modality="text"``), an image path or a PIL image;
        ``first_scores``: the index's scores of ``rows`` (needed when ``fusion > 0``). Returns
        ``(scores, rows)``.
        """
        if self.fusion and first_scores is None:
            raise XmodalError("re-ranking with fusion needs the index's scores of the shortlist")
        keep = rows >= 0
        rows = rows[keep]
        if index.modality == modality:
            raise XmodalError(f"re-ranking scores image-text pairs: a {modality} query against a "
                              f"{index.modality} index has none")
        cand = self._candidate_reps(index, rows)
        if modality == "text":
            q = self.model.encode_text_reps([query])
            scores = self.model.score(cand, q)[:, 0]  # (K,) images x one text
        else:
            img = query if hasattr(query, "convert") else open_indexed_image(str(query))  # PIL or path
            q = self.model.encode_image_reps(pixel_tower(self.model, "an image query").preprocess(img)[None])
            scores = self.model.score(q, cand)[0]  # (K,) one image x texts
        scores = scores.float().cpu().numpy()
        if self.fusion:
            scores = fuse_scores(scores, np.asarray(first_scores)[keep], self.fusion)
        order = np.argsort(-scores, kind="stable")[:k]
        return scores[order], rows[order]
