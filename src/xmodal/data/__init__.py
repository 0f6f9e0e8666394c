"""Datasets: one model (:mod:`xmodal.data.base`), one reader module per format.

Importing this package registers every reader in :data:`DATASETS`; feature extraction
(:mod:`.features`) and the inputs a model reads (:mod:`.pipeline`, :mod:`.inputs`) live here too.
"""
from . import emoji, foodiml, karpathy, precomp, recipe1m, table, vinvl, webdataset  # noqa: F401  (register their readers)
from .base import DATASETS, CrossModalDataset, GroundTruth, list_formats, load_dataset

__all__ = ["DATASETS", "CrossModalDataset", "GroundTruth", "list_formats", "load_dataset"]
