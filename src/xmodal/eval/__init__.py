"""Evaluation: exact streaming retrieval metrics and the field's protocols.

Import from the submodules (:mod:`.metrics`, :mod:`.protocols`); the names below are
re-exported lazily so that ``import xmodal.eval`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "evaluate_embeddings": "xmodal.eval.protocols",
    "ranks_from_embeddings": "xmodal.eval.metrics",
    "ranks_from_score_blocks": "xmodal.eval.metrics",
    "ranks_from_scores": "xmodal.eval.metrics",
    "metrics_from_ranks": "xmodal.eval.metrics",
    "recall_stats": "xmodal.eval.metrics",
    "METRIC_KEYS": "xmodal.eval.metrics",
    "evaluate_protocol": "xmodal.eval.protocols",
    "list_protocols": "xmodal.eval.protocols",
    "protocol_subsets": "xmodal.eval.protocols",
    "PROTOCOLS": "xmodal.eval.protocols",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xmodal.eval' has no attribute {name!r}")
