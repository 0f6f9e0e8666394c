"""Interfaces shared by every tower and model.

Every tower returns a :class:`TowerOutput`: tokens ``(B, N, D)``, a pooled vector ``(B, D)``
and an optional padding mask ``(B, N)`` (True = real token). A model is either an
:class:`EmbeddingScorer` (scores are dot products of independently computed embeddings,
so collections can be indexed) or a :class:`PairScorer` (a score needs both sides at
once; it re-ranks a shortlist). ``index/`` and ``eval/`` tell them apart with
``isinstance``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import torch
from torch import nn

from ..config import parse_args
from ..errors import ConfigError
from ..registry import Registry


@dataclass
class TowerOutput:
    tokens: torch.Tensor  # (B, N, D)
    pooled: torch.Tensor  # (B, D)
    mask: torch.Tensor | None = None  # (B, N) bool, True where a token is real


class ImageTower(nn.Module):
    """Maps an image batch (pixels ``(B, 3, H, W)`` or features) to a :class:`TowerOutput`."""

    output_dim: int
    #: "pixels" for backbones over images, "features" for precomputed feature rows
    input_kind: str = "features"

    def forward(self, images: Any) -> TowerOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def rebuilt_from_source(self) -> bool:
        """True when every weight is loaded from the files its config names (a pretrained
        backbone without a new layer): a checkpoint may then leave the frozen tower out."""
        return False

    def inference_graph(self) -> nn.Module | None:
        """A module for frozen feature extraction (:mod:`xmodal.data.features`): pixels
        ``(B, 3, H, W)`` -> ``(tokens (B, T, D), pooled (B, D))``, equal to :meth:`forward` within
        float rounding, rewritten for speed and traceable (``torch.jit.trace``, ONNX export).
        None (the default): extraction calls :meth:`forward`."""
        return None


class TextTower(nn.Module):
    """Maps a list of strings, via :meth:`tokenize`, to a :class:`TowerOutput`."""

    output_dim: int
    #: the named text fields a multi-field tower reads (title, ingredients, ...); None: one text
    fields: tuple[str, ...] | None = None

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> TowerOutput:  # pragma: no cover
        raise NotImplementedError

    def rebuilt_from_source(self) -> bool:
        """See :meth:`ImageTower.rebuilt_from_source`."""
        return False

    def source_id(self) -> str | None:
        """What identifies the weights beyond the config (a package's version, a file digest), for
        the cache of a frozen tower's outputs; None: the config says it all."""
        return None


class AttachedRun(nn.Module):
    """A finished model attached inside another (a re-ranker's first stage): rebuilt from its
    own run folder, so a checkpoint may leave it out."""

    def rebuilt_from_source(self) -> bool:
        return True


class Scorer(nn.Module):
    """What every model may declare, each hook with its default; eval, index, search and
    train call these, never ``getattr(model, ...)``."""

    def task_name(self) -> str:
        """The training task (:mod:`xmodal.train.tasks`) that trains this model."""
        raise NotImplementedError

    def input_needs(self) -> tuple[str, str] | None:
        """``(image input, text input)`` this model reads (``"pooled"`` / ``"tokens"`` / ...),
        or None to read what the config's heads name (``model.image_head.input``, ...)."""
        return None

    def tower(self, side: str) -> nn.Module | None:
        """The ``"image"`` or ``"text"`` tower (None when the model reads cached features only)."""
        if side not in ("image", "text"):
            raise ValueError(f"side must be 'image' or 'text', got {side!r}")
        return self._modules.get(f"{side}_tower")

    def frozen_prefixes(self) -> list[str]:
        """State-dict prefixes of frozen parts; those rebuilt from their own weights are not saved."""
        return []

    def param_groups(self, cfg: Any = None) -> list[dict[str, Any]] | None:
        """Optimiser groups ``[{"params": [...], "lr_scale": s}, ...]``, or None for one group."""
        return None

    def needs_training(self) -> bool:
        """False for models assembled from finished runs (an ensemble): evaluated from their config."""
        return True

    def prepare_training(self, cfg: Any, run_dir: Any) -> None:
        """Called once before the first training step (e.g. to load ``init_from`` weights)."""

    def artifact_files(self) -> dict[str, Any]:
        """Extra files saved beside the best checkpoint (name -> JSON-able content or text)."""
        return {}


class FrozenTowers:
    """Mixin for models with ``image_tower`` / ``text_tower`` and ``frozen_image`` /
    ``frozen_text`` flags: frozen towers stay in eval mode (pretrained BatchNorm statistics,
    no dropout noise) and their prefixes are declared frozen."""

    frozen_image: bool
    frozen_text: bool

    def train(self, mode: bool = True) -> Any:
        super().train(mode)  # type: ignore[misc]
        for side, frozen in (("image", self.frozen_image), ("text", self.frozen_text)):
            tower = self._modules.get(f"{side}_tower")  # type: ignore[attr-defined]
            if tower is not None and frozen:
                tower.eval()
        return self

    def frozen_prefixes(self) -> list[str]:
        """State-dict prefixes not saved in checkpoints: rebuilt from their own weights."""
        return [p for p, f in (("image_tower.", self.frozen_image), ("text_tower.", self.frozen_text)) if f]


class EmbeddingScorer(Scorer):
    """Scores are ``encode_image(x) @ encode_text(t).T`` on L2-normalised embeddings."""

    def task_name(self) -> str:
        return "contrastive"

    def encode_image(self, images: Any, normalize: bool = True) -> torch.Tensor:  # (B, D)
        raise NotImplementedError

    def encode_text(self, texts: Any, normalize: bool = True) -> torch.Tensor:  # (B, D)
        raise NotImplementedError


class PairScorer(Scorer):
    """Scores need both sides: ``score(image_reps, text_reps) -> (Ni, Nt)``.

    ``image_reps`` / ``text_reps`` are whatever :meth:`encode_image_reps` /
    :meth:`encode_text_reps` return (e.g. region tokens), computed once per item.
    """

    def task_name(self) -> str:
        return "pair"

    def encode_image_reps(self, images: Any) -> Any:
        raise NotImplementedError

    def encode_text_reps(self, texts: Any) -> Any:
        raise NotImplementedError

    def score(self, image_reps: Any, text_reps: Any) -> torch.Tensor:  # (Ni, Nt)
        raise NotImplementedError

    def has_score_pairs(self) -> bool:
        """True when the model overrides :meth:`score_pairs` (arbitrary pairs in one batch)."""
        return type(self).score_pairs is not PairScorer.score_pairs

    def score_pairs(self, image_reps: Any, text_reps: Any, image_idx: Any, text_idx: Any) -> torch.Tensor:
        """Scores ``(P,)`` of the pairs ``(image_idx[p], text_idx[p])`` (see :meth:`has_score_pairs`)."""
        raise NotImplementedError(f"{type(self).__name__} scores whole blocks only (score)")

    def first_stage_embeddings(self, image_reps: Any, text_reps: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(image (Ni, D), text (Nt, D))`` embeddings of a built-in first stage, or None."""
        return None


def pixel_tower(model: Scorer, what: str) -> ImageTower:
    """``model``'s image tower when it reads pixels (and can ``preprocess`` an image), else a
    :class:`ConfigError` saying that ``what`` needs one."""
    tower = model.tower("image")
    if not isinstance(tower, ImageTower) or tower.input_kind != "pixels" or not hasattr(tower, "preprocess"):
        raise ConfigError(f"{what} needs a model that reads pixels, but this run's image tower "
                          f"({type(tower).__name__}) reads precomputed feature rows")
    return tower


IMAGE_TOWERS: Registry[ImageTower] = Registry("image tower")
TEXT_TOWERS: Registry[TextTower] = Registry("text tower")
POOLING: Registry[nn.Module] = Registry("pooling head")
HEADS: Registry[nn.Module] = Registry("head")
MODELS: Registry[Scorer] = Registry("model type")
_A = TypeVar("_A")


#: registered model type -> the dataclass of its ``model.args`` (declared beside the model; the
#: builder parses ``cfg.args`` into it with :func:`parse_model_args` before building anything)
MODEL_ARGS: dict[str, type] = {}


def parse_model_args(cls: type[_A], args: dict | None, model_type: str) -> _A:
    """``model.args`` as an instance of ``cls``: an unknown key or a value of the wrong type is a
    :class:`ConfigError` naming ``model.args.<key>`` (:func:`xmodal.config.parse_args`)."""
    return parse_args(cls, args, "model.args", f"model type {model_type}")


def check_model_args(args: dict, spec: dict[str, Any], model_type: str) -> dict:
    """A copy of ``model.args`` whose keys are all in ``spec`` (key -> type or tuple of types)
    and whose values have those types (a bool is not a number); else a :class:`ConfigError`
    naming the key. Kept for callers with a type table; models declare a dataclass in
    :data:`MODEL_ARGS` and call :func:`parse_model_args`."""
    fields = [(k, Union[want] if isinstance(want, tuple) else want, dataclasses.field(default=None))
              for k, want in spec.items()]
    parsed = parse_model_args(dataclasses.make_dataclass("ModelArgs", fields), args, model_type)
    return {key: getattr(parsed, key) for key in args or {}}
