"""Models: towers (image/text), heads, and full models built by name.

``create_model(cfg)`` builds the model a :class:`xmodal.config.ModelConfig` describes;
``list_models()`` names the registered model types; ``load(run_dir)`` rebuilds a trained
run as a :class:`Run` (model, resolved config, path, step, scorer kind).

Importing this package registers every model type: each module below registers its
constructors in :data:`xmodal.models.base.MODELS`.
"""
from __future__ import annotations

from . import adapt, aladin, cross_encoder, dual  # noqa: F401  (register their model types)
from . import pretrained  # noqa: F401  (registers the pretrained_image / pretrained_text towers)
from .base import MODELS, EmbeddingScorer, PairScorer, Scorer
from .run import Run, create_model, list_models, load

__all__ = ["MODELS", "EmbeddingScorer", "PairScorer", "Run", "Scorer", "create_model", "list_models", "load"]
