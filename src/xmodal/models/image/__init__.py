"""Image towers: precomputed feature rows and pixel backbones.

Importing this package registers ``features``, ``efficientnet_lite0`` and ``hf_vision`` in
:data:`xmodal.models.base.IMAGE_TOWERS`. Heavy dependencies (transformers, the
EfficientNet package) are imported only when a tower is built.
"""
from .efficientnet import EfficientNetLiteTower, resize_center_crop
from .features import FeatureTower
from .hf_vision import HFVisionTower

__all__ = ["EfficientNetLiteTower", "FeatureTower", "HFVisionTower", "resize_center_crop"]
