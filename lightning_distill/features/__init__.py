"""Intermediate-feature distillation: which layers to match (:class:`FeatureMap`), how (projectors), and capture.

:class:`FeatureCapture` records a model's layer outputs with forward hooks (a layer modified in place later in the
forward is copied, or :class:`ModifiedInPlaceError` names it).
"""

from lightning_distill.features._capture import FeatureCapture, ModifiedInPlaceError, Selector
from lightning_distill.features._map import FeatureMap
from lightning_distill.features._projectors import ChannelProjector, ProjectorName

__all__ = ["ChannelProjector", "FeatureCapture", "FeatureMap", "ModifiedInPlaceError", "ProjectorName", "Selector"]
