"""Hard-negative fine-tuning of a cross-encoder, as UNITER / IAIS do it.

``train_itm_hard_negatives.py`` of UNITER and ``lancopku/IAIS``: for every positive pair a
pool of ``negatives`` items of the other modality is drawn at random (never a positive of
the anchor), every ``(anchor, candidate)`` pair is scored without gradients in eval mode,
the ``hard_negatives`` highest-scoring negatives are kept, and the positive plus its kept
negatives are scored again with gradients and trained with a hinge on the sigmoid scores
(:func:`xmodal.losses.relation.ranking_hinge`). Batches whose negatives are texts (the
anchor is an image; IAIS aligns the regions, ``V``) and batches whose negatives are images
(the anchor is a text; IAIS aligns the words, ``L``) alternate by step (``directions:
alternate``) or are both taken every step (``both``: the original accumulates one of each
per optimiser step). The IAIS term is computed on the positive pairs only, from the last
layer's attention (:func:`xmodal.losses.relation.relation_maps`).

The pool comes from the whole training split, so the task needs more than the loop's batch:
the loop calls :meth:`HardNegativeTask.attach_split` once with the prepared split. Draws are
``default_rng([seed, step, salt])``: a pure function of the step, so resume stays exact.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...data.base import GroundTruth
from ...errors import ConfigError, DataError
from ...models.base import TowerOutput
from ...data.inputs import Batch
from .base import TASKS, split_terms

log = logging.getLogger(__name__)

_NEG_STREAM = 0x49_41_49_53  # "IAIS": keeps the negative draws off the batch-order streams


def sample_negatives(candidates: int, positives: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` distinct items of ``range(candidates)``, none in ``positives``, uniformly."""
    pos = np.unique(np.asarray(positives, dtype=np.int64))
    free = candidates - len(pos)
    if free < size:
        raise DataError(f"hard negatives: {free} candidates are not positives of an anchor, fewer than "
                        f"loss.args.negatives={size}; lower it")
    draw = rng.choice(free, size=size, replace=False)  # ranks among the non-positives
    # the r-th non-positive is r plus the number of positives at or below it
    return draw + np.searchsorted(pos - np.arange(len(pos)), draw, side="right")


def hardest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` highest scores of each row of ``scores`` (B, pool)."""
    return scores.topk(k, dim=1).indices


def _take(inputs: TowerOutput, idx: torch.Tensor) -> TowerOutput:
    return TowerOutput(tokens=inputs.tokens[idx], pooled=inputs.pooled[idx], mask=inputs.mask[idx])


class HardNegativeTask(nn.Module):
    """Cross-encoder training step with sampled pools and hard negatives (+ IAIS)."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        if not hasattr(loss, "hard_negatives"):
            raise ConfigError(f"a cross-encoder trains with loss 'iais' (hard negatives), not {type(loss).__name__}")
        self.model = model
        self.loss = loss
        self.split: Any = None
        self.total_steps = 1
        self.seed = 0
        self._text_ids: dict[str, torch.Tensor] | None = None
        self._neighbours: dict[str, np.ndarray] | None = None
        self._first: dict[str, torch.Tensor] | None = None

    # the loop hands the split over once ------------------------------------------------
    def attach_split(self, cfg: Any, split: Any) -> None:
        """Keep the training split (its inputs and ground truth) for drawing negative pools.

        Captions are tokenized once here; pools index the token rows.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError("hard-negative training (loss 'iais') runs in one process; launch without torchrun")
        self.split = split
        self.total_steps = int(cfg.train.steps)
        self.seed = int(cfg.train.seed)
        ds = split.dataset
        need = self.loss.negatives
        if ds.num_images - 1 < need:
            raise ConfigError(f"loss.args.negatives={need}: the training split has only {ds.num_images} images")
        sample = split.texts(np.arange(min(1, ds.num_texts)))
        if isinstance(sample, list) and all(isinstance(s, str) for s in sample):
            batch = self.model.tokenize(split.texts(np.arange(ds.num_texts)))
            self._text_ids = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        self._neighbours = self._first = None
        groups = None
        if self.loss.cross_fit:
            self._first, groups = self._cross_fit_embeddings(cfg)
        elif self.loss.pool == "first_stage" or self.loss.fusion:
            self._first = self._first_stage_embeddings()
        if self.loss.pool == "first_stage":
            self._neighbours = self._first_stage_neighbours(need, groups=groups)
        log.info("hard negatives: pool %d (%s), keep %d, %s directions, alignment %s", need, self.loss.pool,
                 self.loss.hard_negatives, self.loss.directions, self.loss.alignment)

    @torch.no_grad()
    def _first_stage_embeddings(self) -> dict[str, torch.Tensor]:
        """The attached first stage's (``model.args.first_stage``) embeddings of the training
        split: ``{"images": (N, D), "texts": (M, D)}``."""
        fs = self.model.first_stage
        if fs is None:
            raise ConfigError("loss.args.pool: first_stage and loss.args.fusion use the first stage's scores: "
                              "set model.args.first_stage: RUN (an embedding model's run folder)")
        ds = self.split.dataset
        img, txt = self._embed(fs.model, np.arange(ds.num_images), np.arange(ds.num_texts), "first stage: training")
        return {"images": img, "texts": txt}

    def _embed(self, model: nn.Module, images: np.ndarray, texts: np.ndarray,
               label: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An embedding model's float embeddings of these training images and texts (indices
        into the split), in batches of 256."""
        from ...eval.encode import encode_all

        dev = self.model._device()
        img = encode_all(model.encode_image, lambda idx, d: self.split.images(images[idx], d), len(images), 256,
                         f"{label} images", False, dev).float()
        txt = encode_all(lambda x: model.encode_text(list(x)), lambda idx, d: self.split.texts(texts[idx], d),
                         len(texts), 256, f"{label} texts", False, dev).float()
        return img, txt

    @torch.no_grad()
    def _cross_fit_embeddings(self, cfg: Any) -> tuple[dict[str, torch.Tensor], list[tuple[np.ndarray, np.ndarray]]]:
        """Out-of-fold first-stage embeddings of the training split (``loss.args.cross_fit``).

        Run ``f`` of the list was trained with ``data.train_holdout: {folds: K, fold: f}``: it
        never saw fold ``f``'s items, so on them it errs as the first stage errs on the test
        split, while the first stage trained on everything ranks nearly every training positive
        first (no neighbour or fused score on the training split then shows what re-ranking
        must fix). Each fold's items are embedded by the run that held it out; the pools stay
        within the anchor's fold (the runs' spaces differ). Returns the embeddings and the
        folds as ``(text indices, image indices)``.
        """
        from ...config import load_config
        from ...data.base import item_folds
        from ...models.cross_encoder import FirstStage
        from ...data.pipeline import holdout_args

        runs = self.loss.cross_fit
        seen: dict[int, str] = {}
        seeds = set()
        for run in runs:
            path = Path(run) / "config.yaml"
            if not path.is_file():
                raise ConfigError(f"loss.args.cross_fit: {run} is not a run folder (no config.yaml)")
            rcfg = load_config(path)
            if not rcfg.data.train_holdout:
                raise ConfigError(f"loss.args.cross_fit: {run} was trained on the whole split (no "
                                  "data.train_holdout); train each first stage with data.train_holdout.fold=f")
            folds, fold, seed = holdout_args(rcfg.data.train_holdout, f"{path}: data.train_holdout")
            for key in ("format", "path", "train_split", "train_lang"):
                if getattr(rcfg.data, key) != getattr(cfg.data, key):
                    raise ConfigError(f"loss.args.cross_fit: {run} trained on data.{key}="
                                      f"{getattr(rcfg.data, key)!r}, this run on {getattr(cfg.data, key)!r}")
            if folds != len(runs) or fold in seen:
                raise ConfigError(f"loss.args.cross_fit: expected one run per fold of {len(runs)}; {run} holds out "
                                  f"fold {fold} of {folds}" + (f", as {seen[fold]} does" if fold in seen else ""))
            seen[fold] = run
            seeds.add(seed)
        if len(seeds) != 1:
            raise ConfigError(f"loss.args.cross_fit: the runs split the folds with different seeds {sorted(seeds)}")
        ds, dev = self.split.dataset, self.model._device()
        text_fold, image_fold = item_folds(ds.gt, len(runs), seeds.pop())
        img = txt = None
        groups = []
        for fold in range(len(runs)):
            ti, ii = np.flatnonzero(text_fold == fold), np.flatnonzero(image_fold == fold)
            e_img, e_txt = self._embed(FirstStage(seen[fold]).to(dev).model, ii, ti,
                                       f"first stage {fold}: its held-out")
            if img is None:
                img = e_img.new_zeros(ds.num_images, e_img.shape[1])
                txt = e_txt.new_zeros(ds.num_texts, e_txt.shape[1])
            img[torch.from_numpy(ii)], txt[torch.from_numpy(ti)] = e_img, e_txt
            groups.append((ti, ii))
        log.info("cross-fitting: %d out-of-fold first stages, folds of %s texts", len(runs),
                 "/".join(str(len(t)) for t, _ in groups))
        return {"images": img, "texts": txt}, groups

    @torch.no_grad()
    def _first_stage_neighbours(self, size: int, block: int = 1024,
                                groups: list[tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
        """Each text's ``size`` nearest non-positive images and each image's ``size`` nearest
        non-positive texts by the first stage: the pools of ``loss.args.pool: first_stage``.
        With ``groups`` (``(texts, images)`` index arrays, the cross-fitting folds), an anchor's
        neighbours come from its own group only. ``block`` rows at a time."""
        img, txt = self._first["images"], self._first["texts"]
        gt = self.split.dataset.gt
        if groups is None:
            groups = [(np.arange(gt.num_texts), np.arange(gt.num_images))]
        out = {}
        for name, rel in (("images", gt), ("texts", gt.transpose())):
            rows = np.full((rel.num_texts, size), -1, dtype=np.int64)
            widest = int(np.diff(rel.indptr).max()) if rel.num_texts else 0
            for ti, ii in groups:
                q_idx, c_idx = (ti, ii) if name == "images" else (ii, ti)
                queries, cands = (txt, img) if name == "images" else (img, txt)
                queries, cands = queries[torch.from_numpy(q_idx)], cands[torch.from_numpy(c_idx)]
                take = min(len(c_idx), size + widest)
                for a in range(0, len(q_idx), block):
                    top = (queries[a:a + block] @ cands.T).topk(take, dim=1).indices.cpu().numpy()  # (b, take)
                    for r, cand in enumerate(c_idx[top]):
                        anchor = q_idx[a + r]
                        keep = cand[~np.isin(cand, rel.images_of(anchor))][:size]
                        if len(keep) < size:
                            where = " of its fold" if len(groups) > 1 else ""
                            raise DataError(f"hard negatives: fewer than loss.args.negatives={size} non-positive "
                                            f"{name}{where} for an anchor; lower it")
                        rows[anchor] = keep
            out[name] = rows  # anchors of the other modality -> their nearest negative {name}
        return out

    def _texts(self, idx: np.ndarray) -> Any:
        if self._text_ids is None:
            return self.split.texts(idx)
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        mask = self._text_ids["attention_mask"][t]
        width = int(mask.sum(1).max())
        return {"input_ids": self._text_ids["input_ids"][t, :width], "attention_mask": mask[:, :width]}

    def _images(self, idx: np.ndarray) -> Any:
        return self.split.images(np.asarray(idx, dtype=np.int64), self.model._device())

    # one direction ------------------------------------------------------------------------
    def _pools(self, batch: Batch, negatives_are: str, rng: np.random.Generator) -> np.ndarray:
        """(B, 1 + pool) candidate indices, the positive first: a uniform draw of non-positives
        (UNITER), or with ``pool: first_stage`` the anchor's nearest non-positives by the first
        stage (the warm start then keeps k of them at random)."""
        gt: GroundTruth = self.split.dataset.gt
        size = self.loss.negatives
        if self._neighbours is not None:
            anchors = batch.text_idx if negatives_are == "images" else batch.image_idx
            positives = batch.image_idx if negatives_are == "images" else batch.text_idx
            near = self._neighbours[negatives_are][np.asarray(anchors, dtype=np.int64)]  # (B, pool)
            return np.concatenate([np.asarray(positives, dtype=np.int64)[:, None], near], axis=1)
        rows = []
        for t, i in zip(batch.text_idx, batch.image_idx):
            if negatives_are == "images":  # anchor: the text; never one of its images
                neg = sample_negatives(gt.num_images, gt.images_of(int(t)), size, rng)
                rows.append(np.concatenate([[i], neg]))
            else:  # anchor: the image; never one of its captions
                neg = sample_negatives(gt.num_texts, self._texts_of(int(i)), size, rng)
                rows.append(np.concatenate([[t], neg]))
        return np.stack(rows).astype(np.int64)

    def _texts_of(self, image: int) -> np.ndarray:
        if not hasattr(self, "_gt_t"):
            self._gt_t = self.split.dataset.gt.transpose()  # images -> texts
        return self._gt_t.images_of(image)

    def _direction(self, batch: Batch, negatives_are: str, step: int) -> dict[str, torch.Tensor]:
        m, loss = self.model, self.loss
        rng = np.random.default_rng([self.seed, step, _NEG_STREAM, 0 if negatives_are == "texts" else 1])
        pools = self._pools(batch, negatives_are, rng)  # (B, 1 + pool)
        B, C = pools.shape
        k = loss.hard_negatives
        anchor_idx = batch.image_idx if negatives_are == "texts" else batch.text_idx
        anchors = torch.arange(B)[:, None].expand(B, C)  # (B, C)

        def rows_of(cands: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
            """The distinct items of ``cands`` (each embedded once) and each cell's row among them."""
            flat = np.unique(cands)
            return flat, torch.from_numpy(np.searchsorted(flat, cands.ravel())).view(cands.shape)

        def embed(train_mode: bool) -> tuple[TowerOutput, TowerOutput]:
            """(anchors, candidates) in the joint space."""
            m.train(train_mode)
            if negatives_are == "texts":
                return m.embed_images(self._images(anchor_idx)), m.embed_texts(self._texts(flat))
            return m.embed_texts(self._texts(anchor_idx)), m.embed_images(self._images(flat))

        def pairs(a: TowerOutput, c: TowerOutput, ai: torch.Tensor, ci: torch.Tensor) -> tuple[TowerOutput, TowerOutput]:
            img, txt = (a, c) if negatives_are == "texts" else (c, a)
            ii, tt = (ai, ci) if negatives_are == "texts" else (ci, ai)
            return _take(img, ii), _take(txt, tt)

        base = self._fusion_base(pools, anchor_idx, negatives_are).to(m._device())  # (B, C)
        if step < loss.random_steps:
            # warm start: k random negatives of the pool (a uniform pool is a random draw already)
            if self._neighbours is None:
                keep = torch.arange(1, k + 1).expand(B, k)  # (B, k)
            else:
                keep = torch.from_numpy(np.argsort(rng.random((B, C - 1)), axis=1)[:, :k] + 1)  # (B, k)
            cols = torch.cat([torch.zeros(B, 1, dtype=torch.long), keep], dim=1)  # (B, 1 + k) positive first
            # nothing scores the rest of the pool: embed only the positive and the kept ones
            flat, sel = rows_of(np.take_along_axis(pools, cols.numpy(), axis=1))  # (B, 1 + k) rows of ``flat``
        else:
            flat, where = rows_of(pools)  # (B, C) rows of ``flat``
            # 1) score the pool without gradients, in eval mode (the original's self.eval())
            with torch.no_grad():
                a, c = embed(False)
                scores = []
                ai, ci = anchors.reshape(-1), where.reshape(-1)
                for s in range(0, len(ai), m.pair_batch):
                    img, txt = pairs(a, c, ai[s:s + m.pair_batch], ci[s:s + m.pair_batch])
                    scores.append(m.forward_pairs(img, txt)[0])
                pool_scores = torch.cat(scores).view(B, C) + base  # (B, C)
            keep = hardest(pool_scores[:, 1:], k) + 1  # (B, k) columns of the kept negatives
            cols = torch.cat([torch.zeros(B, 1, dtype=torch.long), keep.cpu()], dim=1)  # (B, 1 + k) positive first
            sel = where.gather(1, cols)  # (B, 1 + k) rows of ``flat``
        # 2) the positive and its hardest negatives, with gradients, in train mode
        a, c = embed(True)
        img, txt = pairs(a, c, torch.arange(B)[:, None].expand(B, k + 1).reshape(-1), sel.reshape(-1))
        # no relation alignment during the random-negative warm start: on a model that does not
        # match yet, the alignment term alone flattens the last layer's attention and the score
        # stops depending on the pair (IAIS aligns a matching model: UNITER's, fine-tuned)
        align = loss.needs_maps and step >= loss.random_steps
        rows = torch.arange(B, device=img.tokens.device) * (k + 1) if align else None
        logits, attn = m.forward_pairs(img, txt, relation_rows=rows)
        logits = logits.view(B, k + 1) + base.gather(1, cols.to(base.device))  # (B, 1 + k)
        maps = _positive_relation_maps(attn, img, txt, rows) if attn is not None else None
        modality = "V" if negatives_are == "texts" else "L"
        return loss.combine(logits[:, 0], logits[:, 1:], maps, modality, step, self.total_steps)

    def _fusion_base(self, pools: np.ndarray, anchor_idx: Any, negatives_are: str) -> torch.Tensor:
        """(B, C) loss.fusion x the centred first-stage score of each (anchor, candidate); zeros without fusion."""
        B, C = pools.shape
        base = torch.zeros(B, C)  # (B, C) loss.fusion x first-stage score of each (anchor, candidate)
        if self.loss.fusion:
            fa = self._first["images" if negatives_are == "texts" else "texts"][torch.as_tensor(anchor_idx)]
            fc = self._first[negatives_are][torch.from_numpy(pools)]  # (B, C, D)
            sims = (fc @ fa[:, :, None]).squeeze(-1)  # (B, C)
            # centred per anchor: a query's order ignores a constant, and the sigmoids of the
            # hinge stay off their flat ends
            base = self.loss.fusion * (sims - sims.mean(1, keepdim=True))
        return base

    def training_step(self, batch: Batch, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        if self.split is None:
            raise ConfigError("hard-negative task: no training split attached (the loop calls attach_split)")
        if self.loss.directions == "both":
            sides = ("texts", "images")
        else:
            sides = ("texts",) if step % 2 == 0 else ("images",)
        total: dict[str, torch.Tensor] = {}
        for side in sides:
            for key, v in self._direction(batch, side, step).items():
                total[key] = total[key] + v if key in total and key.endswith("_loss") else v
        self.model.train(True)
        return split_terms(total)


def _positive_relation_maps(attn: Any, img: TowerOutput, txt: TowerOutput, rows: torch.Tensor) -> Any:
    """IAIS relation maps of the positive pairs (``rows`` of the scored pairs), words without [CLS]/[SEP]."""
    from ...losses.relation import relation_maps

    pos_txt = _take(txt, rows)
    pos_img = _take(img, rows)
    L = int(txt.mask.sum(1).max())  # forward_pairs trims the text to the chunk's longest
    length = pos_txt.mask[:, :L].sum(1, keepdim=True)  # (B, 1)
    posn = torch.arange(L, device=length.device)[None]  # (1, L)
    words = pos_txt.mask[:, :L] & (posn > 0) & (posn < length - 1)  # no [CLS], no [SEP]
    return relation_maps(attn, L, words, pos_img.mask)


@TASKS.register("itm_hard_negatives")
def _hard_negatives(model: nn.Module, loss: nn.Module) -> HardNegativeTask:
    return HardNegativeTask(model, loss)
