"""Distillation losses: pure functions in :mod:`~lightning_distill.losses.functional` and their module twins."""

from lightning_distill.losses import functional
from lightning_distill.losses.feature import FeatureLoss
from lightning_distill.losses.functional import Divergence, FeatureLossName
from lightning_distill.losses.kd import DistillationLoss, KDLoss

__all__ = ["DistillationLoss", "Divergence", "FeatureLoss", "FeatureLossName", "KDLoss", "functional"]
