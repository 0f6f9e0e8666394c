"""Datasets: one model (:mod:`xmodal.data.base`), one reader module per format."""
from .base import DATASETS, CrossModalDataset, GroundTruth, list_formats, load_dataset

__all__ = ["DATASETS", "CrossModalDataset", "GroundTruth", "list_formats", "load_dataset"]
