"""Distillation losses."""
from .feature_matching_loss import FeatureMatchingLoss
from .logit_distillation_loss import LogitDistillationLoss

__all__ = ['FeatureMatchingLoss', 'LogitDistillationLoss']
