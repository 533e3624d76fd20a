"""Logit distillation through a teacher's own (frozen) head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiv.registry import MODELS

__all__ = ['LogitDistillationLoss']


@MODELS.register_module()
class LogitDistillationLoss(nn.Module):
    """Hinton's KL divergence between temperature-softened class scores.

    ``loss = loss_weight * T^2 * mean_batch(KL(softmax(t / T) ||
    softmax(s / T)))``, summed over classes. The teacher logits ``t`` are
    detached. Used by ``kiv.KnowledgeInheritance`` for teachers that keep a
    classification head: ``t`` = the head on the teacher's own summary,
    ``s`` = the same head on the student's de-standardised projection, so
    gradients reach the student through the frozen head. Computed in float32
    with autocast off, whatever the dtype of the logits under AMP.

    Args:
        temperature (float): softmax temperature ``T`` > 0. Defaults to 1.
        loss_weight (float): global factor. Defaults to 1.
    """

    def __init__(self, temperature: float = 1.0,
                 loss_weight: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'{type(self).__name__}: temperature must be '
                             f'> 0, got {temperature}')
        self.temperature = float(temperature)
        self.loss_weight = float(loss_weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor
                ) -> Tensor:
        """Compute the loss.

        Args:
            student_logits (Tensor): ``(B, K)`` class scores of the
                inherited head.
            teacher_logits (Tensor): ``(B, K)`` class scores of the teacher.

        Returns:
            Tensor: scalar float32 loss.
        """
        if student_logits.shape != teacher_logits.shape or \
                student_logits.dim() != 2:
            raise ValueError(f'{type(self).__name__}: expected two (B, K) '
                             f'logit tensors, got '
                             f'{tuple(student_logits.shape)} and '
                             f'{tuple(teacher_logits.shape)}')
        t = self.temperature
        with torch.autocast(student_logits.device.type, enabled=False):
            log_p = F.log_softmax(student_logits.float() / t, dim=1)
            log_q = F.log_softmax(teacher_logits.detach().float() / t,
                                  dim=1)
            kl = F.kl_div(log_p, log_q, log_target=True,
                          reduction='batchmean')
            return self.loss_weight * t * t * kl

    def extra_repr(self) -> str:
        return f'temperature={self.temperature}, ' \
               f'loss_weight={self.loss_weight}'
