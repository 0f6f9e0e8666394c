"""Interfaces shared by every tower and model.

Every tower returns a :class:`TowerOutput`: tokens ``(B, N, D)``, a pooled vector ``(B, D)``
and an optional padding mask ``(B, N)`` (True = real token). A model is either an
:class:`EmbeddingScorer` (scores are dot products of independently computed embeddings,
so collections can be indexed) or a :class:`PairScorer` (a score needs both sides at
once; it re-ranks a shortlist). ``index/`` and ``eval/`` tell them apart with
``isinstance``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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


class TextTower(nn.Module):
    """Maps a list of strings, via :meth:`tokenize`, to a :class:`TowerOutput`."""

    output_dim: int

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> TowerOutput:  # pragma: no cover
        raise NotImplementedError

    def rebuilt_from_source(self) -> bool:
        """See :meth:`ImageTower.rebuilt_from_source`."""
        return False


class EmbeddingScorer(nn.Module):
    """Scores are ``encode_image(x) @ encode_text(t).T`` on L2-normalised embeddings."""

    def encode_image(self, images: Any, normalize: bool = True) -> torch.Tensor:  # (B, D)
        raise NotImplementedError

    def encode_text(self, texts: Any, normalize: bool = True) -> torch.Tensor:  # (B, D)
        raise NotImplementedError


class PairScorer(nn.Module):
    """Scores need both sides: ``score(image_reps, text_reps) -> (Ni, Nt)``.

    ``image_reps`` / ``text_reps`` are whatever :meth:`encode_image_reps` /
    :meth:`encode_text_reps` return (e.g. region tokens), computed once per item.
    """

    def encode_image_reps(self, images: Any) -> Any:
        raise NotImplementedError

    def encode_text_reps(self, texts: Any) -> Any:
        raise NotImplementedError

    def score(self, image_reps: Any, text_reps: Any) -> torch.Tensor:  # (Ni, Nt)
        raise NotImplementedError


IMAGE_TOWERS: Registry[ImageTower] = Registry("image tower")
TEXT_TOWERS: Registry[TextTower] = Registry("text tower")
POOLING: Registry[nn.Module] = Registry("pooling head")
HEADS: Registry[nn.Module] = Registry("head")


def _type_name(want: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    types = want if isinstance(want, tuple) else (want,)
    if set(types) >= {int, float}:
        types = tuple(t for t in types if t is not int)
    return " or ".join(names.get(t, t.__name__) for t in types)


def check_model_args(args: dict, spec: dict[str, Any], model_type: str) -> dict:
    """A copy of ``model.args`` whose keys are all in ``spec`` (key -> type or tuple of types)
    and whose values have those types (a bool is not a number); else a :class:`ConfigError`
    naming the key."""
    out = dict(args)
    for key, value in out.items():
        if key not in spec:
            raise ConfigError(f"unknown config key 'model.args.{key}' for model type {model_type}; "
                              f"valid keys: {', '.join(spec)}")
        want = spec[key]
        ok = isinstance(value, bool) if want is bool else (isinstance(value, want) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"model.args.{key}: expected {_type_name(want)}, got {value!r}")
    return out
