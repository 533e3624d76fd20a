"""Distillation losses."""
from .feature_matching_loss import FeatureMatchingLoss

__all__ = ['FeatureMatchingLoss']
