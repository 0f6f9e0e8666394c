"""A single-stream cross-encoder (UNITER-style) for image-text matching, the model of IAIS.

``[CLS] words [SEP] regions`` run through one transformer; the [CLS] output goes through
a pooler (linear + tanh) and a rank head (linear -> one logit), one score per pair.
Faithful to UNITER / ``lancopku/IAIS`` (``model/model.py``, ``model/itm.py``):

- **Text embeddings**: word + position + token type 0, LayerNorm, dropout: the embeddings of
  a Hugging Face BERT-type checkpoint (``text_init``, MiniLM by default), whose first
  ``layers`` transformer layers become the single-stream encoder (all when unset).
- **Image embeddings** (UNITER's ``UniterImageEmbeddings``):
  ``LN(LN(W_f f) + LN(W_p p) + type_1)``, dropout; ``p`` is the 7-value box
  ``x1, y1, x2, y2, w, h, w*h`` (normalised); ``type_1`` is the text embeddings' token-type
  row 1 (the modality embedding). Grid tokens (a frozen CNN's feature map) get their cells
  as boxes (:func:`xmodal.models.transformer.grid_boxes`); regions with 6 box values get
  the area appended.
- **Heads**: pooler ``tanh(W h_[CLS])`` and ``rank_output`` (UNITER's ITM head is
  re-initialised as the rank head after ITM pre-training; without it both start random,
  normal(0, 0.02) with zero bias as UNITER's ``init_weights``).

A pair scorer: :meth:`encode_image_reps` / :meth:`encode_text_reps` give each item's
embedded tokens once; :meth:`score_pairs` concatenates the listed pairs' tokens and runs the
transformer in batches of ``pair_batch`` pairs (two-stage re-ranking); :meth:`score` does the
same over every pair of an ``Ni x Nt`` block (exact, slow: a cross-encoder cannot be indexed).

``model.args.first_stage: RUN`` attaches a finished embedding model (e.g. the dual-encoder
baseline) whose embeddings ride along in the representations' ``pooled`` field, so the run
re-ranks its own first stage (``eval.rerank_k`` during training validation, ``xmodal eval RUN
--rerank-k K``); it is frozen and not saved in checkpoints (rebuilt from its run folder).

Training: ``task_name() == "itm_hard_negatives"`` (:mod:`xmodal.train.tasks.hard_negatives`) with
``loss: {name: iais}`` (:mod:`xmodal.losses.relation`); :meth:`forward_pairs` returns the
last layer's attention logits of the positive pairs for the relation alignment.

Deviations, on purpose: the embedding dropout of an item is drawn once per item and shared by
the pairs it enters during training (the original embeds each pair); grid tokens carry
their cells as boxes (UNITER's regions carry detector boxes).

Options for training without UNITER's pre-training (defaults keep UNITER's behaviour):
``pooling: mean`` scores the mean of all real tokens instead of [CLS] (a mean-pooling
checkpoint such as all-MiniLM-L6-v2 has a [CLS] that hardly depends on the pair);
``new_lr_scale`` multiplies the learning rate of the randomly initialised parts (image
embeddings, rank head, a random pooler; :meth:`CrossEncoder.param_groups`); ``pooler_init``
(default true) copies the checkpoint's BERT pooler, as UNITER starts from BERT's;
``init_std`` (default UNITER's 0.02) for random parts (a 32-d test model needs ~dim^-1/2).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, XmodalError
from .base import (IMAGE_TOWERS, MODEL_ARGS, MODELS, AttachedRun, EmbeddingScorer, PairScorer, TowerOutput,
                   parse_model_args)
from .transformer import TextEmbeddings, TransformerEncoder, image_token_inputs, load_bert

log = logging.getLogger(__name__)


def _init_weights(module: nn.Module, std: float = 0.02) -> None:
    """UNITER's ``init_weights``: normal(0, std) linears / embeddings, zero bias, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class UniterImageEmbeddings(nn.Module):
    """``LN(LN(W_f f) + LN(W_p p) + type)``, dropout: UNITER's image embeddings."""

    def __init__(self, feat_dim: int, dim: int, box_dim: int = 7, dropout: float = 0.1, eps: float = 1e-12) -> None:
        super().__init__()
        self.feat_dim, self.box_dim = feat_dim, box_dim
        self.img_linear = nn.Linear(feat_dim, dim)
        self.img_norm = nn.LayerNorm(dim, eps=eps)
        self.pos_linear = nn.Linear(box_dim, dim) if box_dim else None
        self.pos_norm = nn.LayerNorm(dim, eps=eps) if box_dim else None
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)
        _init_weights(self)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor | None, type_emb: torch.Tensor) -> torch.Tensor:
        if feats.shape[-1] != self.feat_dim:
            raise XmodalError(f"image features are {feats.shape[-1]}-d, the model expects {self.feat_dim}")
        x = self.img_norm(self.img_linear(feats))  # (B, R, D)
        if self.pos_linear is not None:
            x = x + self.pos_norm(self.pos_linear(boxes))
        return self.drop(self.norm(x + type_emb))


def boxes7(boxes: torch.Tensor) -> torch.Tensor:
    """6 box values ``x1, y1, x2, y2, w, h`` -> UNITER's 7 (``w * h`` appended)."""
    return torch.cat([boxes, boxes[..., 4:5] * boxes[..., 5:6]], dim=-1)  # (..., 7)


class FirstStage(AttachedRun):
    """A finished embedding model, frozen; rebuilt from its run folder (not checkpointed)."""

    def __init__(self, run_dir: str) -> None:
        super().__init__()
        from .run import load

        model = load(run_dir).model
        if not isinstance(model, EmbeddingScorer):
            raise ConfigError(f"model.args.first_stage: {run_dir} holds a {type(model).__name__}, "
                              "not an embedding model (a first stage encodes images and texts independently)")
        model.requires_grad_(False)
        self.model = model.eval()
        self.run_dir = str(run_dir)

    def train(self, mode: bool = True) -> "FirstStage":
        return super().train(False)


class CrossEncoder(PairScorer):
    """UNITER-style single-stream image-text matching model; see the module docstring."""

    def task_name(self) -> str:
        return "itm_hard_negatives"


    def __init__(self, image_tower: nn.Module | None, *, image_dim: int, embeddings: TextEmbeddings,
                 encoder: TransformerEncoder, tokenizer: Any, box_dim: int = 7, grid: Any = None,
                 dropout: float = 0.1, max_text_length: int = 40, pair_batch: int = 256,
                 first_stage: str | None = None, frozen_image: bool = True,
                 pooler_state: dict[str, torch.Tensor] | None = None, new_lr_scale: float = 1.0,
                 init_std: float = 0.02, pooling: str = "cls", text_layers: Any = None) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"model.args.pooling: expected cls (UNITER) or mean, got {pooling!r}")
        self.pooling = pooling
        if box_dim not in (0, 7):
            raise ConfigError(f"model.args.box_dim: expected 7 (UNITER's box values) or 0 (no boxes), got {box_dim}")
        if embeddings.token_type.num_embeddings < 2:
            raise ConfigError("cross_encoder: the text embeddings need 2 token types (text, image)")
        self.image_tower = image_tower
        self.frozen_image = frozen_image and image_tower is not None
        self.text_embed = embeddings
        # ALBEF's split of one BERT: the lower layers read the text alone (frozen here: the
        # checkpoint's sentence semantics stay intact and the pairs never re-run them), the
        # upper ones (``encoder``) read [text states; image tokens] together
        self.text_layers = nn.ModuleList(text_layers or [])
        self.text_layers.requires_grad_(False)
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.dim = encoder.dim
        self.grid = tuple(int(g) for g in grid) if grid else None
        self.max_text_length = int(max_text_length)
        self.pair_batch = int(pair_batch)
        self.image_embed = UniterImageEmbeddings(image_dim, self.dim, box_dim, dropout)
        self.pooler = nn.Linear(self.dim, self.dim)
        self.rank_output = nn.Linear(self.dim, 1)
        for mod in (self.image_embed, self.pooler, self.rank_output):
            _init_weights(mod, init_std)
        # UNITER starts from BERT's pooler; the checkpoint's when it has one (MiniLM does)
        self.pooler_pretrained = pooler_state is not None
        if pooler_state is not None:
            with torch.no_grad():
                self.pooler.weight.copy_(pooler_state["weight"])
                self.pooler.bias.copy_(pooler_state["bias"])
        if not new_lr_scale > 0:
            raise ConfigError(f"model.args.new_lr_scale: expected a positive number, got {new_lr_scale!r}")
        self.new_lr_scale = float(new_lr_scale)
        self.first_stage = FirstStage(first_stage) if first_stage else None

    # bookkeeping --------------------------------------------------------------------
    def input_needs(self) -> tuple[str, str]:
        return ("tokens", "tokens")

    def train(self, mode: bool = True) -> "CrossEncoder":
        super().train(mode)
        if self.image_tower is not None and self.frozen_image:
            self.image_tower.eval()  # pretrained BatchNorm statistics, no dropout noise
        self.text_layers.eval()  # frozen: no dropout noise either
        return self

    def frozen_prefixes(self) -> list[str]:
        """State-dict prefixes not saved in checkpoints: rebuilt from their own weights."""
        out = ["first_stage."]
        if self.frozen_image:
            out.append("image_tower.")
        return out

    def _device(self) -> torch.device:
        return self.pooler.weight.device

    def param_groups(self, cfg: Any = None) -> list[dict[str, Any]]:
        """Optimiser groups: the parts without pre-trained weights (image embeddings, rank head,
        a random pooler) learn at ``new_lr_scale`` x ``optim.lr``, the rest at ``optim.lr``.

        The loop multiplies each group's scheduled rate by its ``lr_scale``. UNITER fine-tunes
        every part at one rate, but from a pre-trained image embedding and ITM head; without
        them, at the encoder's rate the new parts barely move in a CPU-sized run.
        """
        new_mods = [self.image_embed, self.rank_output] + ([] if self.pooler_pretrained else [self.pooler])
        new = {id(p) for mod in new_mods for p in mod.parameters()}
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if self.new_lr_scale == 1.0:
            return [{"params": [p for _, p in trainable], "lr_scale": 1.0}]
        return [{"params": [p for _, p in trainable if id(p) not in new], "lr_scale": 1.0},
                {"params": [p for _, p in trainable if id(p) in new], "lr_scale": self.new_lr_scale}]

    # item embeddings ------------------------------------------------------------------
    def _image_inputs(self, images: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(features (B, R, F), boxes (B, R, 7) or None, mask (B, R) or None)``."""
        feats, boxes, mask = image_token_inputs(images, self.image_tower, self._device(),
                                                run_tower_with_grad=not self.frozen_image,
                                                box_dim=self.image_embed.box_dim, grid=self.grid,
                                                who="cross_encoder")
        if boxes is not None:
            if boxes.shape[-1] == 6:
                boxes = boxes7(boxes)
            if boxes.shape[-1] != 7:
                raise XmodalError(f"image boxes have {boxes.shape[-1]} values, expected 6 or 7")
        return feats, boxes, mask

    def embed_images(self, images: Any) -> TowerOutput:
        """Image tokens (B, R, D) in the joint space, mask (B, R)."""
        feats, boxes, mask = self._image_inputs(images)
        type_emb = self.text_embed.token_type.weight[1]  # (D,) the image modality row
        x = self.image_embed(feats, boxes, type_emb)  # (B, R, D)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return TowerOutput(tokens=x, pooled=x.new_zeros(x.shape[0], 0), mask=mask)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids + attention mask, ``[CLS] ... [SEP]``, at most ``max_text_length`` tokens."""
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_length,
                              return_tensors="pt")

    def embed_texts(self, texts: Any) -> TowerOutput:
        """Text tokens (B, L, D) ``[CLS] words [SEP]`` (after the text-only layers), mask (B, L)."""
        batch = texts if isinstance(texts, dict) else self.tokenize(texts)
        device = self._device()
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device).bool()
        x = self.text_embed(ids, torch.zeros_like(ids))  # (B, L, D)
        if len(self.text_layers):
            with torch.no_grad():
                attn_mask = None if bool(mask.all()) else mask
                for layer in self.text_layers:
                    x, _ = layer(x, attn_mask)
        return TowerOutput(tokens=x, pooled=x.new_zeros(x.shape[0], 0), mask=mask)

    # pairs ------------------------------------------------------------------------------
    def forward_pairs(self, img: TowerOutput, txt: TowerOutput, relation_rows: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rank logits ``(P,)`` of aligned pairs ``img`` (P, R, D) / ``txt`` (P, L, D).

        With ``relation_rows`` (indices into the P pairs), also the last layer's attention
        logits of those pairs ``(len(rows), H, L + R, L + R)`` (text first), for IAIS.
        """
        L = int(txt.mask.sum(1).max()) if txt.mask is not None else txt.tokens.shape[1]
        tt, tm = txt.tokens[:, :L], txt.mask[:, :L]  # trim the chunk's padding
        x = torch.cat([tt, img.tokens], dim=1)  # (P, L + R, D)
        mask = torch.cat([tm, img.mask], dim=1)  # (P, L + R)
        if bool(mask.all()):
            mask = None  # no padding: the unmasked attention kernels are faster
        layers = self.encoder.layers
        for layer in layers[:-1]:
            x, _ = layer(x, mask)
        logits = None
        if relation_rows is not None and len(layers):
            last = layers[-1]
            h = x.index_select(0, relation_rows)
            h = last.norm1(h) if last.norm_first else h
            attn = last.attn
            P, N, D = h.shape
            H = attn.heads
            q = attn.query(h).view(P, N, H, D // H).transpose(1, 2)  # (P, H, N, Dh)
            k = attn.key(h).view(P, N, H, D // H).transpose(1, 2)
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(D // H)  # (P, H, N, N)
        if len(layers):
            x, _ = layers[-1](x, mask)
        if self.encoder.final_norm is not None:
            x = self.encoder.final_norm(x)
        if self.pooling == "mean":  # mean over the real tokens of both modalities
            w = mask.float() if mask is not None else x.new_ones(x.shape[:2])  # (P, L + R)
            h = (x * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)  # (P, D)
        else:
            h = x[:, 0]  # [CLS]
        pooled = torch.tanh(self.pooler(h))  # (P, D)
        return self.rank_output(pooled).squeeze(-1), logits

    def _pair_chunks(self, n: int) -> range:
        return range(0, n, max(1, self.pair_batch))

    def _score_index(self, img: TowerOutput, txt: TowerOutput, ii: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        out = []
        for s in self._pair_chunks(len(ii)):
            a, b = ii[s:s + self.pair_batch], tt[s:s + self.pair_batch]
            pi = TowerOutput(tokens=img.tokens[a], pooled=img.pooled[a], mask=img.mask[a])
            pt = TowerOutput(tokens=txt.tokens[b], pooled=txt.pooled[b], mask=txt.mask[b])
            out.append(self.forward_pairs(pi, pt)[0])
        return torch.cat(out) if out else img.tokens.new_zeros(0)

    # PairScorer interface ----------------------------------------------------------------
    def encode_image_reps(self, images: Any) -> TowerOutput:
        """Embedded image tokens (B, R, D) + mask; ``pooled`` = the first stage's embedding, if any."""
        reps = self.embed_images(images)
        if self.first_stage is not None:
            reps.pooled = self.first_stage.model.encode_image(images).float()
        return reps

    def encode_text_reps(self, texts: Any) -> TowerOutput:
        """Embedded text tokens (B, L, D) + mask; ``pooled`` = the first stage's embedding, if any."""
        reps = self.embed_texts(texts)
        if self.first_stage is not None:
            reps.pooled = self.first_stage.model.encode_text(list(texts)).float()
        return reps

    def score(self, image_reps: TowerOutput, text_reps: TowerOutput) -> torch.Tensor:
        """All pairs ``(Ni, Nt)``, ``pair_batch`` pairs per transformer call."""
        ni, nt = image_reps.tokens.shape[0], text_reps.tokens.shape[0]
        dev = image_reps.tokens.device
        ii = torch.arange(ni, device=dev).repeat_interleave(nt)  # (Ni*Nt,) image-major
        tt = torch.arange(nt, device=dev).repeat(ni)
        return self._score_index(image_reps, text_reps, ii, tt).view(ni, nt)  # (Ni, Nt)

    def score_pairs(self, image_reps: TowerOutput, text_reps: TowerOutput, image_idx: Any,
                    text_idx: Any) -> torch.Tensor:
        """Scores ``(P,)`` of the listed pairs (re-ranking a shortlist), batched."""
        ii = torch.as_tensor(image_idx, dtype=torch.long, device=image_reps.tokens.device)
        tt = torch.as_tensor(text_idx, dtype=torch.long, device=text_reps.tokens.device)
        return self._score_index(image_reps, text_reps, ii, tt)

    def first_stage_embeddings(self, image_reps: TowerOutput,
                               text_reps: TowerOutput) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The attached first stage's embeddings (``model.args.first_stage``), None without one
        (set ``model.args.first_stage: RUN`` or pass ``--first-stage RUN``)."""
        if self.first_stage is None or image_reps.pooled.shape[-1] == 0:
            return None
        return image_reps.pooled, text_reps.pooled

    # training -----------------------------------------------------------------------------
    def prepare_training(self, cfg: Any, run_dir: Any) -> None:
        """Start from a finished run's weights (``model.args.init_from``: fine-tuning after a
        matching pre-training, as IAIS starts from UNITER) and check that validation can rank:
        two-stage needs a first stage."""
        src = (cfg.model.args or {}).get("init_from")
        if src:
            from .aladin import load_weights_from

            load_weights_from(self, src)
        if cfg.eval.rerank_k and self.first_stage is None:
            raise ConfigError(f"eval.rerank_k={cfg.eval.rerank_k}: validation re-ranks a first stage; set "
                              "model.args.first_stage: RUN (e.g. the emoji baseline run) or eval.rerank_k=0 "
                              "(exact: every pair through the transformer, slow)")




# ------------------------------------------------------------------------------------------
# construction from a config
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrossEncoderArgs:
    """``model.args`` of ``type: cross_encoder`` (:class:`CrossEncoder`, see :func:`build_cross_encoder`)."""

    #: the BERT checkpoint of the tokenizer and (``text_init_weights``) the weights; None: MiniLM
    text_init: str | None = None
    text_init_weights: bool = True
    #: checkpoint layers kept in the joint encoder (None: all above ``text_layers``)
    layers: int | None = None
    #: a random model's size (``text_init_weights: false`` only)
    dim: int = 64
    depth: int = 2
    heads: int = 4
    ff_dim: int | None = None
    dropout: float = 0.1
    box_dim: int = 7
    grid: list[int] | None = None
    max_text_length: int = 40
    pair_batch: int = 256
    #: a finished embedding model's run folder: the first stage that shortlists for re-ranking
    first_stage: str | None = None
    pooler_init: bool = True
    new_lr_scale: float = 1.0
    init_std: float = 0.02
    pooling: Literal["cls", "mean"] = "cls"
    #: a finished run whose weights training starts from (read by ``prepare_training``)
    init_from: str | None = None
    #: checkpoint layers that read the text alone, below the joint encoder
    text_layers: int = 0


MODEL_ARGS["cross_encoder"] = CrossEncoderArgs
_RANDOM_ONLY = ("dim", "depth", "heads", "ff_dim")


def build_cross_encoder(cfg) -> CrossEncoder:
    """Build the cross-encoder from a :class:`xmodal.config.ModelConfig` (``type: cross_encoder``).

    ``text_init`` (default MiniLM) gives the tokenizer and, unless ``text_init_weights: false``,
    the text embeddings and the first ``layers`` transformer layers; with ``text_init_weights:
    false`` the model is random at ``dim`` / ``depth`` / ``heads`` / ``ff_dim`` (tests).
    """
    from . import image as _image  # noqa: F401  (registers image towers)

    args = parse_model_args(CrossEncoderArgs, cfg.args, "cross_encoder")
    given = set(cfg.args or {})
    dropout = args.dropout
    # UNITER's 0.02 suits 768-d; a small random model (tests) needs ~dim^-1/2, or the value and
    # output projections shrink the attention so much that [CLS] ignores the pair
    init_std = args.init_std
    if not init_std > 0:
        raise ConfigError(f"model.args.init_std: expected a positive number, got {init_std!r}")
    bert = load_bert(args.text_init, dropout=dropout)
    pooler_state = None
    if args.text_init_weights:
        bad = [k for k in _RANDOM_ONLY if k in given]
        if bad:
            raise ConfigError(f"model.args.{bad[0]}: set by the text_init checkpoint; remove it "
                              "(or set text_init_weights: false for a random model)")
        embeddings, encoder = bert["embeddings"], bert["encoder"]
        below = args.text_layers
        keep = args.layers
        keep = encoder.depth - below if keep is None else keep
        if not 0 <= below < encoder.depth:
            raise ConfigError(f"model.args.text_layers: expected 0..{encoder.depth - 1} (the checkpoint has "
                              f"{encoder.depth} layers and the joint encoder needs one), got {below}")
        if not 1 <= keep <= encoder.depth - below:
            raise ConfigError(f"model.args.layers: expected 1..{encoder.depth - below} (the checkpoint's layers "
                              f"above text_layers: {below}), got {keep}")
        layers = list(encoder.layers)
        text_layers = layers[:below]
        encoder.layers = nn.ModuleList(layers[below:below + keep])
        encoder.depth = keep
        if args.pooler_init:
            pooler_state = _checkpoint_pooler(bert["path"])
    else:
        if "pooler_init" in given and args.pooler_init:
            raise ConfigError("model.args.pooler_init: only with text_init_weights: true (the checkpoint's pooler)")
        for key in ("layers", "text_layers"):
            if key in given:
                raise ConfigError(f"model.args.{key}: only with text_init_weights: true; use depth")
        text_layers = []
        dim, depth, heads = args.dim, args.depth, args.heads
        embeddings = TextEmbeddings(len(bert["tokenizer"]), dim, 512, 2, dropout)
        encoder = TransformerEncoder(dim, depth, heads, args.ff_dim, dropout)
        _init_weights(embeddings, init_std)
        _init_weights(encoder, init_std)
    image_tower = IMAGE_TOWERS.create(cfg.image.name, **cfg.image.args)
    if getattr(image_tower, "input_kind", "features") == "features":
        image_dim = int(cfg.image.args.get("in_dim", 2048))  # region rows are the tokens themselves
        image_tower = None
    else:
        image_dim = int(image_tower.output_dim)
        if cfg.image.frozen:
            image_tower.requires_grad_(False)
            image_tower.eval()
    return CrossEncoder(image_tower, image_dim=image_dim, embeddings=embeddings, encoder=encoder,
                        tokenizer=bert["tokenizer"], box_dim=args.box_dim, grid=args.grid,
                        dropout=dropout, max_text_length=args.max_text_length,
                        pair_batch=args.pair_batch, first_stage=args.first_stage,
                        frozen_image=cfg.image.frozen, pooler_state=pooler_state,
                        new_lr_scale=args.new_lr_scale, init_std=init_std,
                        pooling=args.pooling, text_layers=text_layers)


def _checkpoint_pooler(path: str) -> dict[str, torch.Tensor] | None:
    """The checkpoint's BERT pooler ``{weight, bias}``, or None when it has none."""
    from .transformer import bert_prefix, read_state

    state = read_state(Path(path))
    pre = bert_prefix(state)
    if f"{pre}pooler.dense.weight" not in state:
        log.info("%s has no pooler; the cross-encoder's pooler starts random", path)
        return None
    return {"weight": state[f"{pre}pooler.dense.weight"], "bias": state[f"{pre}pooler.dense.bias"]}


@MODELS.register("cross_encoder")
def _build(cfg) -> nn.Module:
    return build_cross_encoder(cfg)
