"""The inherited path of one teacher output, for downstream heads and
backbones (``kiv.InheritedBackbone``).

Student -> student-to-teacher head -> inverse standardisation gives the
student's prediction in the teacher's own raw space (what
``KnowledgeInheritance.inherit`` computes). :class:`InheritedPath` rebuilds
that path for one output of one teacher (its summary, or one dense level)
from the file that holds the shared latent space: an exported student
written with ``tools/export_student.py --keep-heads`` (entry
``inherited_heads``) or the distillation checkpoint itself (``latent.*``).
Its weights are fixed and never re-initialised. With ``calibrate=True`` it
also applies the label-free calibration stored with the heads
(:mod:`kiv.models.connectors.calibration`, filled by
``kiv.InheritedCalibrationHook`` at the end of distillation).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional, Sequence

from torch import Tensor, nn

from kiv.utils.state_dict import (first_keys, load_state_dict_checked,
                                  read_checkpoint, select_prefix,
                                  unwrap_state_dict)
from .calibration import InheritedStatistics, calibrate, calibration_affine
from .s2t_heads import DenseS2THead, S2THead
from .standardizers import StatisticsStandardizer, build_standardizer

__all__ = ['InheritedPathError', 'InheritedPath', 'read_latent_state',
           'dense_levels']


class InheritedPathError(ValueError):
    """The file holds no usable inherited path (named in the message)."""


def read_latent_state(path: str) -> dict[str, Tensor]:
    """The shared latent space's weights stored in a checkpoint.

    Args:
        path (str): an exported student with ``inherited_heads``
            (``--keep-heads``) or a distillation checkpoint (``latent.*``).

    Returns:
        dict[str, Tensor]: ``SharedLatentSpace`` state dict.

    Raises:
        InheritedPathError: neither is in the file.
        FileNotFoundError: the file does not exist.
    """
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get('inherited_heads'),
                                                Mapping):
        return dict(ckpt['inherited_heads'])
    latent = select_prefix(unwrap_state_dict(ckpt, path), 'latent.')
    if not latent:
        raise InheritedPathError(
            f'{path}: no inherited heads (no "inherited_heads" entry, no '
            '"latent.*" weights): export the student with '
            'tools/export_student.py --keep-heads, or give the distillation '
            'checkpoint')
    return latent


def dense_levels(latent: Mapping[str, Tensor], teacher: str) -> list[int]:
    """The dense levels of ``teacher`` that have an s2t head, in order.

    Args:
        latent (Mapping[str, Tensor]): :func:`read_latent_state` output.
        teacher (str): teacher name.

    Returns:
        list[int]: e.g. ``[0, 1, 2, 3]``; empty for a summary-only teacher
        or one not in the file.
    """
    return sorted({int(m.group(1)) for k in latent if (m := re.match(
        rf'feature_heads\.{re.escape(teacher)}\.(\d+)\.', k))})


def _standardize_mode(state: Mapping[str, Tensor]) -> str:
    """``'phis'`` / ``'channel'`` / ``'none'`` from a standardiser's
    buffers (PHI-S keeps a full second moment, per channel a diagonal)."""
    if 'ema_moment2' not in state:
        return 'none'
    return 'phis' if state['ema_moment2'].dim() == 2 else 'channel'


class InheritedPath(nn.Module):
    """One teacher output's s2t head + inverse standardisation, fixed.

    The head's sizes (input, hidden, output widths, skip path) and the
    standardiser's kind are read off the stored weights.

    Args:
        checkpoint (str): see :func:`read_latent_state`.
        teacher (str): teacher name in the distillation config, e.g.
            ``'clip'``.
        level (int, optional): the teacher's dense level (negative counts
            from the last); None for its summary. Defaults to None.
        norm_cfg (dict, optional): the heads' norm, as in
            ``SharedLatentSpace``. Defaults to LN.
        act_cfg (dict, optional): the heads' activation. Defaults to GELU.
        latent (Mapping[str, Tensor], optional): the file's latent state,
            already read (:func:`read_latent_state`), to build several
            paths from one read; ``checkpoint`` then only names the file in
            messages. Defaults to None: read ``checkpoint``.
        calibrate (bool): map each output channel onto the teacher's mean
            and standard deviation with the calibration statistics stored
            in the file. Defaults to False.

    Raises:
        InheritedPathError: the teacher or level is not in the file, its
            standardiser has no statistics, or ``calibrate`` is set and the
            file has no calibration for it.
    """

    def __init__(self, checkpoint: str, teacher: str,
                 level: Optional[int] = None,
                 norm_cfg: Optional[dict] = None,
                 act_cfg: Optional[dict] = None,
                 latent: Optional[Mapping[str, Tensor]] = None,
                 calibrate: bool = False) -> None:
        super().__init__()
        if latent is None:
            latent = read_latent_state(checkpoint)
        if level is None:
            head_key = f'summary_heads.{teacher}.'
            std_key = f'summary_standardizers.{teacher}.'
            cal_key = f'summary_calibrations.{teacher}.'
            what = f'teacher {teacher!r} summary'
        else:
            levels = dense_levels(latent, teacher)
            if not -len(levels) <= level < len(levels):
                raise InheritedPathError(
                    f'{checkpoint}: teacher {teacher!r} has dense levels '
                    f'{levels}, no level {level}')
            level = levels[level]
            head_key = f'feature_heads.{teacher}.{level}.'
            std_key = f'feature_standardizers.{teacher}.{level}.'
            cal_key = f'feature_calibrations.{teacher}.{level}.'
            what = f'teacher {teacher!r} level {level}'
        head_state = select_prefix(latent, head_key)
        std_state = select_prefix(latent, std_key)
        if 'fc1.weight' not in head_state:
            teachers = sorted({k.split('.')[1] for k in latent
                               if k.startswith(('summary_heads.',
                                                'feature_heads.'))})
            raise InheritedPathError(
                f'{checkpoint}: no s2t head for the {what} ({head_key}*); '
                f'teachers with heads: {teachers}; keys: '
                f'{first_keys(sorted(latent))}')
        hidden, in_dim = head_state['fc1.weight'].shape
        out_dim = head_state['fc2.weight'].shape[0]
        head_cls = S2THead if level is None else DenseS2THead
        self.head = head_cls(in_dim, out_dim, hidden, norm_cfg=norm_cfg,
                             act_cfg=act_cfg,
                             with_skip='skip.weight' in head_state)
        load_state_dict_checked(self.head, head_state, checkpoint,
                                f's2t head of the {what}',
                                error=InheritedPathError)
        self.standardizer = build_standardizer(_standardize_mode(std_state),
                                               out_dim)
        load_state_dict_checked(self.standardizer, std_state, checkpoint,
                                f'standardiser of the {what}',
                                error=InheritedPathError)
        if isinstance(self.standardizer, StatisticsStandardizer) and \
                not self.standardizer.initialized:
            raise InheritedPathError(
                f'{checkpoint}: the standardiser of the {what} has no '
                'statistics (the checkpoint was saved before the warm-up)')
        self.calibrated = calibrate
        if calibrate:  # fixed: computed once, one multiply-add per call
            scale, shift = calibration_affine(self._read_calibration(
                select_prefix(latent, cal_key), checkpoint, what, out_dim),
                self.standardizer)
            self.register_buffer('cal_scale', scale.float(),
                                 persistent=False)
            self.register_buffer('cal_shift', shift.float(),
                                 persistent=False)
        self.teacher, self.level = teacher, level
        self.in_dim, self.out_dim = in_dim, out_dim
        self.requires_grad_(False)
        self.head._is_init = True  # parents' init_weights() keep the file's

    def _read_calibration(self, state: Mapping[str, Tensor], checkpoint: str,
                          what: str, dim: int) -> InheritedStatistics:
        """The stored calibration statistics of this output."""
        if not isinstance(self.standardizer, StatisticsStandardizer):
            raise InheritedPathError(
                f'{checkpoint}: the {what} has no teacher statistics '
                "(standardize='none'), so it cannot be calibrated")
        stats = InheritedStatistics(dim)
        if state:
            load_state_dict_checked(stats, state, checkpoint,
                                    f'calibration of the {what}',
                                    error=InheritedPathError)
        if not stats.initialized:
            raise InheritedPathError(
                f'{checkpoint}: no calibration statistics for the {what}: '
                'distil with kiv.InheritedCalibrationHook (it measures them '
                'after the last step), or set calibrate=False')
        return stats

    def forward(self, x: Tensor,
                size: Optional[Sequence[int]] = None) -> Tensor:
        """Map student features to the teacher's raw space.

        Args:
            x (Tensor): a student summary ``(B, in_dim)``, or a student map
                ``(B, in_dim, H, W)`` for a dense level.
            size (tuple[int, int], optional): output grid of a dense level.
                Defaults to the input's.

        Returns:
            Tensor: ``(B, out_dim)`` or ``(B, out_dim, h, w)`` (calibrated
            if built with ``calibrate=True``).
        """
        if self.level is None:
            out = self.standardizer.inverse(self.head(x))
        else:
            out = self.standardizer.inverse(
                self.head(x, x.shape[-2:] if size is None else size))
        if self.calibrated:
            out = calibrate(out, self.cal_scale, self.cal_shift)
        return out
