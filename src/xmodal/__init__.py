"""xmodal: cross-modal image-text retrieval.

Public API (imported lazily so that ``import xmodal`` stays cheap):

- :func:`evaluate_embeddings` - exact streaming Recall@K / medR / meanR / rsum.
- :func:`load_dataset`, :func:`list_formats` - every dataset format on one model.
- :func:`create_model`, :func:`list_models`, :func:`load` - models; ``load(RUN)`` returns a
  :class:`~xmodal.models.run.Run` (model, config, path, step, kind).
"""
from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_LAZY = {
    "evaluate_embeddings": "xmodal.eval.protocols",
    "load_dataset": "xmodal.data.base",
    "list_formats": "xmodal.data.base",
    "CrossModalDataset": "xmodal.data.base",
    "GroundTruth": "xmodal.data.base",
    "XmodalError": "xmodal.errors",
    "create_model": "xmodal.models",
    "list_models": "xmodal.models",
    "load": "xmodal.models",
    "Run": "xmodal.models.run",
    "Index": "xmodal.index",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xmodal' has no attribute {name!r}")
