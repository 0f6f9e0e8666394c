"""Heads over tower outputs: pooling (mean, max, GPO); pair heads live beside them."""
from .pooling import GPO, MaxPool, MeanPool, as_mask, create_pooling, list_pooling

__all__ = ["GPO", "MaxPool", "MeanPool", "as_mask", "create_pooling", "list_pooling"]
