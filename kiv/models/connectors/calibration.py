"""Label-free calibration of inherited outputs.

A student trained with MSE predicts the conditional mean of every target
channel: its inherited outputs (student -> s2t head -> inverse
standardisation) are shrunk towards the teacher's mean, with less spread
than the teacher's own outputs. A head trained on the teacher's exact
outputs (an RPN's objectness, a classifier's margins) then reads them at the
wrong scale. Calibration maps each channel of an inherited output onto the
teacher's mean and standard deviation::

    y' = (y - mu_s) * sigma_t / sigma_s + mu_t

``mu_t, sigma_t``: the teacher's, read off the output's standardiser (its
exact statistics over the distillation data); ``mu_s, sigma_s``: the
student's inherited output over the same kind of images
(:class:`InheritedStatistics`, filled by ``kiv.InheritedCalibrationHook`` at
the end of distillation). No label is used. The statistics are saved with
the shared latent space, so an export with ``--keep-heads`` carries them to
``kiv.InheritedPath`` / ``kiv.InheritedBackbone`` (``calibrate=True``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..layers.precision import fp32_compute
from .standardizers import (ChannelStandardizer, StatisticsStandardizer,
                            _check_channels, _out_dtype, _work_dtype)

__all__ = ['InheritedStatistics', 'calibration_affine', 'calibrate']


class InheritedStatistics(ChannelStandardizer):
    """Per-channel statistics of one inherited output (the student side of
    the calibration).

    A :class:`ChannelStandardizer` of the student's raw-space predictions:
    its statistics come from summed :meth:`batch_sums` given to
    :meth:`load_sums`. Checkpoints written before calibration existed load
    as "no statistics yet" (:attr:`initialized` False).

    Args:
        dim (int): channels ``C`` of the output.
        eps (float): variance epsilon. Defaults to 1e-6.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)

    def _load_from_state_dict(self, state_dict: dict, prefix: str,
                              local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list,
                              error_msgs: list) -> None:
        # a checkpoint without calibration: no statistics (not an error)
        for name, buf in self._buffers.items():
            if name in self._non_persistent_buffers_set:
                continue
            state_dict.setdefault(prefix + name, torch.zeros_like(buf))
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)


@torch.no_grad()
def calibration_affine(student: InheritedStatistics,
                       teacher: StatisticsStandardizer
                       ) -> tuple[Tensor, Tensor]:
    """The per-channel map of the calibration, ``y' = y * scale + shift``.

    Args:
        student (InheritedStatistics): the inherited output's statistics.
        teacher (StatisticsStandardizer): the output's standardiser (the
            teacher's statistics).

    Returns:
        tuple[Tensor, Tensor]: float64 ``scale = sigma_t / sigma_s`` and
        ``shift = mu_t - mu_s * scale``, each ``(C,)``.

    Raises:
        RuntimeError: either side has no statistics.
    """
    for who, stats in (('inherited output', student), ('teacher', teacher)):
        if not stats.initialized:
            raise RuntimeError(
                f'calibrate: no statistics of the {who} yet (run '
                'kiv.InheritedCalibrationHook at the end of distillation)')
    scale = (teacher.variance + teacher.eps).sqrt() / \
        (student.variance + student.eps).sqrt()
    return scale, teacher.mean - student.mean * scale


def calibrate(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Apply a calibration map (:func:`calibration_affine`) per channel.

    Args:
        x (Tensor): the inherited output in the teacher's raw space,
            ``(N, C)`` or ``(B, C, H, W)``.
        scale (Tensor): ``(C,)``.
        shift (Tensor): ``(C,)``.

    Returns:
        Tensor: same shape; float32 under autocast, else ``x.dtype``.
    """
    _check_channels(x, scale.numel(), 'calibrate')
    dtype = _work_dtype(x)
    shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    with fp32_compute(x.device.type):
        return torch.addcmul(shift.to(dtype).view(shape), x.to(dtype),
                             scale.to(dtype).view(shape)).to(_out_dtype(x))
