"""ALADIN: ALign And DIstill Network (Messina et al., CBMI 2022; ALADIN-2.0, Bianchi et al.).

Two heads on one transformer backbone, faithful to ``mesnico/ALADIN`` (``alad/alad_model.py``,
``alad/loss.py``) and the five training setups of ``alad/configs`` / ALADIN-2.0:

- **Backbone.** One stack of transformer layers (VinVL's BERT in the original; shared by the
  two modalities, ``shared-transformer: True``) run *separately* over the image tokens and
  over the word tokens. Image tokens: a learnt [IMG] token, then the region or grid features
  plus their 6 box values through a linear map and LayerNorm (Oscar's ``img_embedding``).
  Word tokens: either a BERT-type model's own embeddings and layers (``text_init``: the
  backbone *is* that BERT, e.g. VinVL / ``bert-base-uncased``; MiniLM for tests) or the
  tokens of a text tower (e.g. frozen MiniLM) projected to the backbone width.
- **Alignment head** (precise, a pair scorer): every image token and word token is
  L2-normalised, the region-word cosine matrix of a pair is aggregated with ``MrSw``: max
  over regions, sum over words. Special tokens are dropped explicitly:
  ``align_skip_image: [first, last]`` / ``align_skip_text: [first, last]`` count tokens
  removed from the start and from the end of each item's *real* tokens. The original drops
  the image's first token and the caption's [CLS] and its last two tokens (``s_seq[:, 1:-2]``,
  lengths minus 3: the final full stop and [SEP]), i.e. ``[1, 0]`` and ``[1, 2]``.
- **Matching head** (fast, an embedding scorer): two more transformer layers (4 heads,
  feed-forward width = model width, ReLU, post-LN: ``nn.TransformerEncoderLayer`` as in the
  original's ``final_projection_net``), shared by both modalities, over the backbone outputs;
  the first token's output, L2-normalised, is the embedding.

Training (:class:`xmodal.train.tasks.aladin.AladinTask`, ``task_name() == "aladin"``) computes the batch's alignment and
matching score matrices and the configured :class:`xmodal.losses.distill.AladinLoss` terms.
``model.args.freeze_backbone`` fixes everything but the matching head (the ``*-finetune``
setups, ``freeze-teran: True``); ``model.args.init_from`` starts from a finished run (the
original's ``--load-teacher-model``).

Evaluation: ``model.args.eval_head: alignment`` builds :class:`Aladin`, a pair scorer whose
representations carry the matching embeddings as ``pooled``, so
``xmodal eval RUN --rerank-k K`` is ALADIN's two-stage retrieval (matching head top ``k``,
re-ranked by the alignment head). ``eval_head: matching`` builds :class:`AladinMatching`,
the same modules and weights exposing ``encode_image`` / ``encode_text``: an embedding scorer
that eval, index and search treat as any dual encoder. :func:`load_run` reloads a run with
either head.

Deviations, on purpose: padded regions never win the max over regions (the original fills
padded entries of the alignment matrix with 0 before the max); the frozen backbone runs in
eval mode (the original keeps dropout on under ``no_grad``); an [IMG] token is learnt instead
of VinVL's first region slot; ``activate_distillation_after`` counts optimiser steps (the
original intends epochs, though its configs spell the key with underscores while
``train.py`` reads it with dashes, so it is 0 there).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, XmodalError
from .base import (IMAGE_TOWERS, MODEL_ARGS, MODELS, TEXT_TOWERS, EmbeddingScorer, FrozenTowers, PairScorer,
                   TowerOutput, parse_model_args)
from .transformer import ImageEmbeddings, TransformerEncoder, image_token_inputs, load_bert

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger(__name__)

HEADS = ("alignment", "matching")


# ------------------------------------------------------------------------------------------
# the alignment head's score: MrSw
# ------------------------------------------------------------------------------------------
def mrsw_scores(x: torch.Tensor, x_mask: torch.Tensor | None, y: torch.Tensor, y_mask: torch.Tensor | None,
                chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """``MrSw`` scores ``(Ni, Nt)``: for every image ``i`` and caption ``t``,
    ``sum_w max_r <x_ir, y_tw>`` over real regions ``r`` and real words ``w``.

    ``x`` (Ni, R, D) image tokens, ``y`` (Nt, W, D) word tokens (normalise them for cosines),
    masks True = real. One matrix product per chunk of images; memory ``chunk_bytes``.
    """
    ni, r, d = x.shape
    nt, w, _ = y.shape
    xm = torch.ones(ni, r, dtype=torch.bool, device=x.device) if x_mask is None else x_mask
    ym = torch.ones(nt, w, dtype=torch.bool, device=y.device) if y_mask is None else y_mask
    yf = y.reshape(nt * w, d)  # (Nt*W, D)
    step = max(1, chunk_bytes // max(1, 4 * r * nt * w * 3))
    out = []
    for s in range(0, ni, step):
        xc = x[s:s + step]
        c = xc.shape[0]
        sim = (xc.reshape(c * r, d) @ yf.t()).view(c, r, nt, w)  # (c, R, Nt, W)
        sim = sim.masked_fill(~xm[s:s + step, :, None, None], float("-inf"))
        best = sim.amax(1).clamp_min(-1.0)  # (c, Nt, W); an image without regions scores -1 per word
        out.append(torch.where(ym[None], best, best.new_zeros(())).sum(-1))  # (c, Nt)
    return torch.cat(out) if out else x.new_zeros(0, nt)


def mrsw_pair_scores(x: torch.Tensor, x_mask: torch.Tensor | None, y: torch.Tensor,
                     y_mask: torch.Tensor | None) -> torch.Tensor:
    """``MrSw`` of aligned pairs: ``x`` (P, R, D) with ``y`` (P, W, D) -> ``(P,)``."""
    sim = torch.bmm(x, y.transpose(1, 2))  # (P, R, W)
    if x_mask is not None:
        sim = sim.masked_fill(~x_mask[:, :, None], float("-inf"))
    best = sim.amax(1).clamp_min(-1.0)  # (P, W)
    if y_mask is not None:
        best = torch.where(y_mask, best, best.new_zeros(()))
    return best.sum(-1)


def skip_tokens(tokens: torch.Tensor, mask: torch.Tensor | None, first: int,
                last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop ``first`` tokens from the start and mask the ``last`` real tokens of every row.

    Real tokens are left-aligned (padding at the end), as tokenizers and feature files give
    them. Returns ``(tokens (B, N - first, D), mask (B, N - first))``; masked tokens are 0.
    """
    B, N, _ = tokens.shape
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=tokens.device)
    tokens, mask = tokens[:, first:], mask[:, first:]
    if last:
        length = mask.sum(1, keepdim=True)  # (B, 1) real tokens left
        pos = torch.arange(mask.shape[1], device=mask.device)[None]  # (1, N')
        mask = mask & (pos < length - last)
    return tokens * mask[..., None].to(tokens.dtype), mask


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------
class Aladin(FrozenTowers, PairScorer):
    """ALADIN evaluated with its alignment head (a pair scorer); see the module docstring."""

    eval_head = "alignment"

    def __init__(self, image_tower: nn.Module | None, text_tower: nn.Module | None, *, image_dim: int,
                 text_dim: int | None = None, dim: int = 256, depth: int = 2, heads: int = 4,
                 ff_dim: int | None = None, dropout: float = 0.1, activation: str = "gelu",
                 norm_first: bool = False, shared_backbone: bool = True, box_dim: int = 6,
                 grid: Sequence[int] | None = None, bert: dict | None = None, max_text_length: int = 40,
                 match_layers: int = 2, match_heads: int = 4, match_ff_dim: int | None = None,
                 match_dropout: float = 0.1, align_skip_image: Sequence[int] = (1, 0),
                 align_skip_text: Sequence[int] = (1, 2), freeze_backbone: bool = False,
                 frozen_image: bool = True, frozen_text: bool = True, chunk_mb: float = 64) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.frozen_image = frozen_image and image_tower is not None
        self.frozen_text = frozen_text and text_tower is not None
        self.grid = tuple(int(g) for g in grid) if grid else None
        self.skip_image = tuple(int(s) for s in align_skip_image)
        self.skip_text = tuple(int(s) for s in align_skip_text)
        self.chunk_bytes = int(chunk_mb * (1 << 20))
        self.max_text_length = int(max_text_length)
        self.tokenizer = None
        if bert is not None:  # the backbone is a BERT-type model: its embeddings, layers, tokenizer
            dim = bert["encoder"].dim
            self.text_embed = bert["embeddings"]
            self.tokenizer = bert["tokenizer"]
            self.backbone = bert["encoder"]
            self.text_proj = None
        else:
            if text_dim is None:
                raise ConfigError("aladin: a text tower or model.args.text_init is needed")
            self.text_embed = None
            self.text_proj = nn.Sequential(nn.Linear(text_dim, dim), nn.LayerNorm(dim, eps=1e-12), nn.Dropout(dropout))
            self.backbone = TransformerEncoder(dim, depth, heads, ff_dim, dropout, activation, norm_first)
        self.dim = dim
        self.image_backbone = None if shared_backbone else TransformerEncoder(
            dim, self.backbone.depth, self.backbone.heads, ff_dim, dropout, activation, norm_first)
        self.image_embed = ImageEmbeddings(image_dim, dim, box_dim, dropout)
        if bert is not None and bert.get("image") is not None:
            self._load_oscar_image_embedding(bert["image"])
        self.image_cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.matching = TransformerEncoder(dim, match_layers, match_heads, match_ff_dim or dim, match_dropout,
                                           "relu", False, 1e-5)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:  # everything below the matching head, trainable towers included
            for m in self._backbone_modules():
                m.requires_grad_(False)
            self.image_cls.requires_grad_(False)

    # construction helpers -----------------------------------------------------------
    def _load_oscar_image_embedding(self, img: dict) -> None:
        emb = self.image_embed
        f, b = emb.feat_dim, emb.box_dim
        w = img["weight"]
        if w.shape != (self.dim, f + b):
            log.warning("checkpoint image embedding is %s, the model's %s + %s; not loaded", tuple(w.shape), f, b)
            return
        with torch.no_grad():
            emb.feat.weight.copy_(w[:, :f])
            emb.feat.bias.copy_(img["bias"])
            if emb.box is not None:
                emb.box.weight.copy_(w[:, f:])
            if img.get("norm_weight") is not None:
                emb.norm.weight.copy_(img["norm_weight"])
                emb.norm.bias.copy_(img["norm_bias"])

    def _backbone_modules(self) -> list[nn.Module]:
        mods = [self.backbone, self.image_embed]
        for m in (self.image_backbone, self.text_embed, self.text_proj, self.image_tower, self.text_tower):
            if m is not None:
                mods.append(m)
        return mods

    def input_needs(self) -> tuple[str, str]:
        return ("tokens", "tokens")

    def task_name(self) -> str:
        return "aladin"

    def train(self, mode: bool = True) -> "Aladin":
        super().train(mode)  # frozen towers stay in eval mode (FrozenTowers)
        if self.freeze_backbone:
            for m in self._backbone_modules():
                m.eval()
        return self

    def _device(self) -> torch.device:
        return self.image_cls.device

    # backbone -----------------------------------------------------------------------
    def _image_inputs(self, images: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(features (B, R, F), boxes (B, R, 6) or None, mask (B, R) or None)``."""
        return image_token_inputs(images, self.image_tower, self._device(),
                                  run_tower_with_grad=not (self.frozen_image or self.freeze_backbone),
                                  box_dim=self.image_embed.box_dim, grid=self.grid, who="aladin")

    def image_states(self, images: Any) -> TowerOutput:
        """Backbone outputs over ``[IMG] + image tokens``: tokens (B, 1 + R, D), mask (B, 1 + R)."""
        feats, boxes, mask = self._image_inputs(images)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            x = self.image_embed(feats, boxes)  # (B, R, D)
            B = x.shape[0]
            x = torch.cat([self.image_cls.expand(B, -1, -1), x], dim=1)  # (B, 1 + R, D)
            if mask is not None:
                mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)
            x = (self.image_backbone or self.backbone)(x, mask)
        return TowerOutput(tokens=x, pooled=x[:, 0], mask=mask)

    def text_states(self, texts: Any) -> TowerOutput:
        """Backbone outputs over the word tokens ([CLS] ... [SEP]): (B, L, D), mask (B, L)."""
        device = self._device()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            if self.text_embed is not None:
                batch = texts if isinstance(texts, dict) else self.tokenizer(
                    list(texts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt")
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"].to(device).bool()
                types = batch.get("token_type_ids")
                x = self.text_embed(ids, None if types is None else types.to(device))  # (B, L, D)
            else:
                if isinstance(texts, TowerOutput):
                    feats = texts
                elif self.text_tower is None:
                    raise XmodalError("ALADIN model has no text tower: pass cached TowerOutput tokens")
                else:
                    batch = texts if isinstance(texts, dict) else self.text_tower.tokenize(list(texts))
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    fixed = self.frozen_text or self.freeze_backbone
                    with torch.set_grad_enabled(torch.is_grad_enabled() and not fixed):
                        feats = self.text_tower(batch)
                mask = None if feats.mask is None else feats.mask.to(device).bool()
                x = self.text_proj(feats.tokens.to(device).float())  # (B, L, D)
            x = self.backbone(x, mask)
        return TowerOutput(tokens=x, pooled=x[:, 0], mask=mask)

    # heads --------------------------------------------------------------------------
    def matching_embedding(self, states: TowerOutput) -> torch.Tensor:
        """The matching head: two layers over the backbone outputs, first token, L2-normalised."""
        x = self.matching(states.tokens, states.mask)  # (B, N, D)
        return F.normalize(x[:, 0], dim=-1)

    def alignment_tokens(self, states: TowerOutput, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised tokens (B, N', D) and mask the alignment head scores (special tokens dropped)."""
        first, last = self.skip_image if side == "image" else self.skip_text
        return skip_tokens(F.normalize(states.tokens, dim=-1), states.mask, first, last)

    def alignment_scores(self, image_reps: TowerOutput, text_reps: TowerOutput) -> torch.Tensor:
        """``MrSw`` scores ``(Ni, Nt)`` of alignment representations."""
        return mrsw_scores(image_reps.tokens, image_reps.mask, text_reps.tokens, text_reps.mask, self.chunk_bytes)

    # PairScorer interface -----------------------------------------------------------
    def encode_image_reps(self, images: Any) -> TowerOutput:
        """Alignment tokens (B, R', D) + mask, and the matching embedding as ``pooled`` (B, D)."""
        st = self.image_states(images)
        tokens, mask = self.alignment_tokens(st, "image")
        return TowerOutput(tokens=tokens, pooled=self.matching_embedding(st), mask=mask)

    def encode_text_reps(self, texts: Any) -> TowerOutput:
        """Alignment tokens (B, W', D) + mask, and the matching embedding as ``pooled`` (B, D)."""
        st = self.text_states(texts)
        tokens, mask = self.alignment_tokens(st, "text")
        return TowerOutput(tokens=tokens, pooled=self.matching_embedding(st), mask=mask)

    def score(self, image_reps: TowerOutput, text_reps: TowerOutput) -> torch.Tensor:
        """The alignment head's ``MrSw`` scores ``(Ni, Nt)``."""
        return self.alignment_scores(image_reps, text_reps)

    @torch.no_grad()
    def score_pairs(self, image_reps: TowerOutput, text_reps: TowerOutput, image_idx: Any,
                    text_idx: Any) -> torch.Tensor:
        """Alignment scores ``(P,)`` of the listed pairs (re-ranking a shortlist)."""
        ii = torch.as_tensor(image_idx, dtype=torch.long, device=image_reps.tokens.device)
        tt = torch.as_tensor(text_idx, dtype=torch.long, device=text_reps.tokens.device)
        r, w, d = image_reps.tokens.shape[1], text_reps.tokens.shape[1], image_reps.tokens.shape[2]
        step = max(1, self.chunk_bytes // max(1, 4 * (r * w + (r + w) * d)))
        out = []
        for s in range(0, len(ii), step):
            a, b = ii[s:s + step], tt[s:s + step]
            xm = None if image_reps.mask is None else image_reps.mask[a]
            ym = None if text_reps.mask is None else text_reps.mask[b]
            out.append(mrsw_pair_scores(image_reps.tokens[a], xm, text_reps.tokens[b], ym))
        return torch.cat(out) if out else image_reps.tokens.new_zeros(0)

    def first_stage_embeddings(self, image_reps: TowerOutput,
                               text_reps: TowerOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The matching head's embeddings: ALADIN's fast first stage."""
        return image_reps.pooled, text_reps.pooled

    # training -----------------------------------------------------------------------
    def prepare_training(self, cfg: Any, run_dir: Any) -> None:
        """Start from a finished run's weights (``model.args.init_from``), as ``--load-teacher-model``."""
        src = (cfg.model.args or {}).get("init_from")
        if src:
            load_weights_from(self, src)


class AladinMatching(Aladin, EmbeddingScorer):
    """ALADIN evaluated with its matching head: an embedding scorer (same weights as :class:`Aladin`)."""

    eval_head = "matching"

    def encode_image(self, images: Any, normalize: bool = True) -> torch.Tensor:  # (B, D)
        return self.matching_embedding(self.image_states(images))

    def encode_text(self, texts: Any, normalize: bool = True) -> torch.Tensor:  # (B, D)
        return self.matching_embedding(self.text_states(texts))


def load_weights_from(model: nn.Module, src: str | Path) -> None:
    """Copy a run's saved weights (``RUN/best`` or a checkpoint folder) into ``model``.

    Every saved tensor must exist in ``model`` with the same shape; the backbone and both
    heads are usually all there (frozen towers are rebuilt from their own weights).
    """
    from safetensors.torch import load_file

    path = Path(src)
    for cand in (path / "best" / "model.safetensors", path / "model.safetensors"):
        if cand.exists():
            break
    else:
        raise ConfigError(f"model.args.init_from: {path} holds no best/model.safetensors (a finished run folder?)")
    saved = load_file(str(cand))
    own = model.state_dict()
    bad = [k for k, v in saved.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ConfigError(f"model.args.init_from: {cand} does not fit this model ({len(bad)} tensors differ, "
                          f"e.g. {bad[:3]}); use the same model.args as that run")
    with torch.no_grad():
        for k, v in saved.items():
            own[k].copy_(v)
    skip = tuple(model.frozen_prefixes())
    missing = [k for k in own if k not in saved and not (skip and k.startswith(skip))]
    log.info("init_from %s: %d tensors loaded%s", cand, len(saved),
             f", {len(missing)} not in it (kept as initialised)" if missing else "")




# ------------------------------------------------------------------------------------------
# construction from a config
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AladinArgs:
    """``model.args`` of ``type: aladin`` (:class:`Aladin`, or :class:`AladinMatching` with
    ``eval_head: matching``)."""

    dim: int = 256
    depth: int = 2
    heads: int = 4
    ff_dim: int | None = None
    dropout: float = 0.1
    activation: str = "gelu"
    norm_first: bool = False
    shared_backbone: bool = True
    box_dim: int = 6
    grid: list[int] | None = None
    #: a BERT checkpoint for the text side (then ``dim`` ... ``norm_first`` come from it)
    text_init: str | None = None
    max_text_length: int = 40
    match_layers: int = 2
    match_heads: int = 4
    match_ff_dim: int | None = None
    match_dropout: float = 0.1
    #: ``[first, last]`` tokens left out of the alignment (two non-negative integers)
    align_skip_image: tuple[int, ...] = (1, 0)
    align_skip_text: tuple[int, ...] = (1, 2)
    eval_head: Literal["alignment", "matching"] = "alignment"
    freeze_backbone: bool = False
    #: a finished run whose weights training starts from (read by ``prepare_training``)
    init_from: str | None = None
    chunk_mb: float = 64.0


MODEL_ARGS["aladin"] = AladinArgs
#: the fields the builder reads itself; the others are passed on to the model as they are
_BUILDER_ONLY = ("eval_head", "init_from", "text_init")


def _check_args(args: dict | None) -> AladinArgs:
    out = parse_model_args(AladinArgs, args, "aladin")
    for key in ("align_skip_image", "align_skip_text"):
        v = getattr(out, key)
        if len(v) != 2 or any(n < 0 for n in v):
            raise ConfigError(f"model.args.{key}: expected [first, last], two non-negative integers, got {list(v)!r}")
    return out


def _tower(registry, tcfg) -> nn.Module:
    tower = registry.create(tcfg.name, **tcfg.args)
    if tcfg.frozen:
        tower.requires_grad_(False)
        tower.eval()
    return tower


def build_aladin(cfg) -> Aladin:
    """Build ALADIN from a :class:`xmodal.config.ModelConfig` (``type: aladin``)."""
    from . import image as _image  # noqa: F401  (registers image towers)
    from . import text as _text  # noqa: F401  (registers text towers)

    parsed = _check_args(cfg.args)
    given = set(cfg.args or {})
    head, text_init = parsed.eval_head, parsed.text_init  # init_from: used by prepare_training only
    args = {f.name: getattr(parsed, f.name) for f in fields(parsed) if f.name not in _BUILDER_ONLY}
    image_tower = _tower(IMAGE_TOWERS, cfg.image)
    if getattr(image_tower, "input_kind", "features") == "features":
        # region rows are the image tokens themselves (Oscar's img_embedding is in the model)
        image_dim = int(cfg.image.args.get("in_dim", 2048))
        image_tower = None
    else:
        image_dim = int(image_tower.output_dim)
    bert = text_tower = None
    text_dim = None
    if text_init:
        bert = load_bert(text_init, dropout=args["dropout"] if "dropout" in given else None)
        for key in ("dim", "depth", "heads", "ff_dim", "activation", "norm_first"):
            if key in given:
                raise ConfigError(f"model.args.{key}: set by the BERT checkpoint of text_init, remove it")
    else:
        text_tower = _tower(TEXT_TOWERS, cfg.text)
        text_dim = int(text_tower.output_dim)
    cls = AladinMatching if head == "matching" else Aladin
    return cls(image_tower, text_tower, image_dim=image_dim, text_dim=text_dim, bert=bert,
               frozen_image=cfg.image.frozen, frozen_text=cfg.text.frozen, **args)


@MODELS.register("aladin")
def _build(cfg) -> nn.Module:
    return build_aladin(cfg)


def load_run(run_dir: str | Path, eval_head: str | None = None, checkpoint: str = "best",
             device: str = "cpu") -> "Run":
    """Reload an ALADIN run, evaluated with ``eval_head`` (default: the run's own)."""
    from ..config import load_config
    from .run import Run, checkpoint_dir, load_weights_file, step_of

    run_dir = Path(run_dir)
    path = checkpoint_dir(run_dir, checkpoint)
    cfg = load_config(path / "config.yaml")
    if cfg.model.type != "aladin":
        raise ConfigError(f"{run_dir}: model type {cfg.model.type!r} is not aladin")
    if eval_head is not None:
        if eval_head not in HEADS:
            raise ConfigError(f"eval_head: expected alignment or matching, got {eval_head!r}")
        cfg.model.args["eval_head"] = eval_head
    model = build_aladin(cfg.model)
    load_weights_file(model, path / "model.safetensors")
    return Run(model.to(device).eval(), cfg, run_dir, step_of(path), path)

