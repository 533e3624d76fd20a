"""Feature matching loss between student projections and teacher targets."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiv.registry import MODELS

__all__ = ['FeatureMatchingLoss']


@MODELS.register_module()
class FeatureMatchingLoss(nn.Module):
    """Weighted sum of cosine, smooth-L1 and MSE distances.

    ``loss = loss_weight * (cosine_weight * mean(1 - cos(pred, target))
    + smooth_l1_weight * mean(smooth_l1(pred, target; beta))
    + mse_weight * mean((pred - target)^2))``

    The cosine is taken over the channel dim (dim 1) and averaged over the
    batch and all positions; smooth-L1 and MSE are averaged over all
    elements. The loss is computed in float32 (float64 for float64 inputs)
    with autocast off, whatever the dtype of ``pred`` under AMP. Common
    settings:

    * AM-RADIO summary: ``cosine_weight=1`` (the default);
    * AM-RADIO dense: ``cosine_weight=0.9, smooth_l1_weight=0.1``;
    * RADIOv2.5 on PHI-S targets: ``cosine_weight=0, mse_weight=1``.

    Args:
        cosine_weight (float): weight of the cosine distance. Defaults to 1.
        smooth_l1_weight (float): weight of smooth-L1. Defaults to 0.
        mse_weight (float): weight of the mean squared error. Defaults to 0.
        beta (float): smooth-L1 threshold between L2 and L1. Defaults to 1.
        loss_weight (float): global factor. Defaults to 1.
    """

    def __init__(self,
                 cosine_weight: float = 1.0,
                 smooth_l1_weight: float = 0.0,
                 mse_weight: float = 0.0,
                 beta: float = 1.0,
                 loss_weight: float = 1.0) -> None:
        super().__init__()
        name = type(self).__name__
        weights = dict(cosine_weight=cosine_weight,
                       smooth_l1_weight=smooth_l1_weight,
                       mse_weight=mse_weight)
        for key, value in weights.items():
            if value < 0:
                raise ValueError(f'{name}: {key} must be >= 0, got {value}')
        if not any(weights.values()):
            raise ValueError(f'{name}: at least one of {sorted(weights)} '
                             f'must be > 0')
        if beta < 0:
            raise ValueError(f'{name}: beta must be >= 0, got {beta}')
        self.cosine_weight = cosine_weight
        self.smooth_l1_weight = smooth_l1_weight
        self.mse_weight = mse_weight
        self.beta = beta
        self.loss_weight = loss_weight

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            pred (Tensor): student projection, ``(B, C)`` summary or
                ``(B, C, H, W)`` map.
            target (Tensor): teacher target of the same shape.

        Returns:
            Tensor: scalar loss, float32 (float64 if an input is float64).
        """
        if pred.shape != target.shape or pred.dim() < 2:
            raise ValueError(f'{type(self).__name__}: pred and target must '
                             f'have the same (B, C, ...) shape, got '
                             f'{tuple(pred.shape)} and {tuple(target.shape)}')
        dtype = torch.promote_types(
            torch.promote_types(pred.dtype, target.dtype), torch.float32)
        with torch.autocast(pred.device.type, enabled=False):
            pred, target = pred.to(dtype), target.to(dtype)
            loss = pred.new_zeros(())
            if self.cosine_weight:
                cosine = F.cosine_similarity(pred, target, dim=1)
                loss = loss + self.cosine_weight * (1 - cosine).mean()
            if self.smooth_l1_weight:
                loss = loss + self.smooth_l1_weight * F.smooth_l1_loss(
                    pred, target, beta=self.beta)
            if self.mse_weight:
                loss = loss + self.mse_weight * F.mse_loss(pred, target)
            return self.loss_weight * loss

    def extra_repr(self) -> str:
        return (f'cosine_weight={self.cosine_weight}, '
                f'smooth_l1_weight={self.smooth_l1_weight}, '
                f'mse_weight={self.mse_weight}, beta={self.beta}, '
                f'loss_weight={self.loss_weight}')
