"""``kiv.InheritedBackbone``: a student whose maps are given in a teacher's
space, for downstream necks and heads.

A distilled student learns, through its student-to-teacher heads, to give
each teacher's outputs. Downstream, a toolbox neck usually reads the
student's own pyramid; this wrapper gives it the student's prediction of
one teacher's dense levels instead (student -> s2t head -> inverse
standardisation, :class:`~kiv.models.connectors.InheritedPath`), like
RADIO's per-teacher adaptors. For a detector or a segmenter trained on few
labels that is the purpose-specific teacher's feature space (e.g. its FPN),
which a small neck trained on those labels need not rediscover from the
student's maps: the s2t heads are non-linear per position, a neck's lateral
convs are linear.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional, Sequence

from mmengine.model import BaseModule
from torch import Tensor, nn

from kiv.registry import MODELS
from kiv.structures import FeatureOutput
from ..connectors.inherited_path import (InheritedPath, InheritedPathError,
                                         dense_levels, read_latent_state)

__all__ = ['InheritedBackbone']


@MODELS.register_module()
class InheritedBackbone(BaseModule):
    """A kiv student's maps in one teacher's raw feature space.

    Output ``j`` is the teacher's level ``l = out_indices[j]`` (default:
    every level, in order): ``InheritedPath(checkpoint, teacher, level=l)``
    applied to the student's map ``student_levels[l]``, at that map's grid
    scaled by ``scale_factors[l]`` (``ceil(h * f), ceil(w * f)``, any input
    size; e.g. ``0.5`` for a teacher's stride-64 level read from the
    student's stride-32 map, as mmdet's FPN makes P6).
    The paths' weights are fixed (they are the distillation's); the student
    is built, loaded and frozen as its own config says.

    Args:
        backbone (dict): the student, built from ``kiv.MODELS`` (e.g.
            ``kiv.AdapterViT`` with ``init_cfg=dict(type='Pretrained',
            checkpoint='student.pth')``); needs ``forward_features``
            returning a :class:`~kiv.structures.FeatureOutput`.
        checkpoint (str): the file with the shared latent space: a student
            exported with ``tools/export_student.py --keep-heads`` or the
            distillation checkpoint.
        teacher (str): the teacher whose dense levels are given, e.g.
            ``'det'``.
        student_levels (Sequence[int], optional): the student map feeding
            each of the teacher's levels, as the distillation config's
            ``latent.teachers[teacher].student_levels``. Defaults to
            ``0, 1, ...`` (one per level of the teacher in the file).
        scale_factors (Sequence[float], optional): grid scale of each
            output level relative to its student map. Defaults to 1.0 for
            every level.
        out_indices (Sequence[int], optional): the teacher levels given
            (indices into its levels, as ``student_levels``); only those
            are built and run. Defaults to every level.
        calibrate (bool): apply the label-free calibration stored with the
            heads (each channel at the teacher's mean and standard
            deviation; measured by ``kiv.InheritedCalibrationHook`` at the
            end of distillation). Defaults to False.
        init_cfg (dict, optional): mmengine init config of the wrapper.
            Defaults to None.

    Raises:
        InheritedPathError: the teacher is not in the file, it has no
            dense level, ``student_levels`` / ``scale_factors`` do not
            give one entry per teacher level, ``out_indices`` names no
            level or one it does not have, or ``calibrate`` is set and the
            file has no calibration.
    """

    def __init__(self,
                 backbone: dict,
                 checkpoint: str,
                 teacher: str,
                 student_levels: Optional[Sequence[int]] = None,
                 scale_factors: Optional[Sequence[float]] = None,
                 out_indices: Optional[Sequence[int]] = None,
                 calibrate: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone)
        latent = read_latent_state(checkpoint)
        levels = dense_levels(latent, teacher)
        if not levels:
            dense = sorted({k.split('.')[1] for k in latent
                            if k.startswith('feature_heads.')})
            raise InheritedPathError(
                f'InheritedBackbone: {checkpoint}: no dense s2t head for '
                f'teacher {teacher!r}; teachers with dense heads: {dense}')
        num = len(levels)
        if student_levels is None:
            student_levels = range(num)
        student_levels = tuple(int(i) for i in student_levels)
        if len(student_levels) != num:
            raise InheritedPathError(
                f'InheritedBackbone: {checkpoint}: teacher {teacher!r} has '
                f'{num} dense levels, student_levels='
                f'{list(student_levels)} gives {len(student_levels)}')
        scale_factors = tuple(float(f) for f in (
            [1.0] * num if scale_factors is None else scale_factors))
        if len(scale_factors) != num or min(scale_factors) <= 0:
            raise InheritedPathError(
                f'InheritedBackbone: {checkpoint}: teacher {teacher!r} has '
                f'{num} dense levels, scale_factors={list(scale_factors)} '
                'must give one positive factor per level')
        wanted = range(num) if out_indices is None else \
            [int(i) for i in out_indices]
        if not wanted or not all(-num <= i < num for i in wanted):
            raise InheritedPathError(
                f'InheritedBackbone: {checkpoint}: teacher {teacher!r} has '
                f'{num} dense levels, out_indices={list(wanted)}')
        self.out_indices = tuple(i % num for i in wanted)
        # only the given levels are built and run
        self.student_levels = tuple(student_levels[i]
                                    for i in self.out_indices)
        self.scale_factors = tuple(scale_factors[i] for i in self.out_indices)
        paths = [InheritedPath(checkpoint, teacher, level=i, latent=latent,
                               calibrate=calibrate)
                 for i in self.out_indices]
        self.paths = nn.ModuleList(paths)
        self.teacher = teacher

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of each output level (the teacher's)."""
        return tuple(p.out_dim for p in self.paths)

    def get_layer_depth(self, param_name: str,
                        prefix: str = '') -> tuple[int, int]:
        """Layer id of a parameter for layer-wise learning-rate decay: the
        student's own (see ``AdapterViT.get_layer_depth``; its parameters
        are ``<prefix>backbone.*`` here). The fixed paths, like every
        parameter outside the student, get the last layer (they never
        train).

        Args:
            param_name (str): parameter name, e.g.
                ``'backbone.backbone.base.model.blocks.3.attn.qkv.weight'``.
            prefix (str): prefix of this module's parameters. Defaults to
                ``''``.

        Returns:
            tuple[int, int]: ``(layer_id, num_layers)``.

        Raises:
            TypeError: the student has no ``get_layer_depth``.
        """
        inner = getattr(self.backbone, 'get_layer_depth', None)
        if inner is None:
            raise TypeError(
                f'InheritedBackbone: its student '
                f'{type(self.backbone).__name__} has no get_layer_depth '
                '(needed by layer-wise lr decay)')
        return inner(param_name, prefix + 'backbone.')

    def _to_teacher(self, maps: Mapping[int, Tensor]) -> tuple[Tensor, ...]:
        """Teacher-space maps from the student maps, ``{index: map}``."""
        missing = sorted(set(self.student_levels) - set(maps))
        if missing:
            raise InheritedPathError(
                f'InheritedBackbone: student_levels='
                f'{list(self.student_levels)}, but the student gives maps '
                f'{sorted(maps)}')
        out = []
        for path, lv, f in zip(self.paths, self.student_levels,
                               self.scale_factors):
            x = maps[lv]
            if x.shape[1] != path.in_dim:
                raise InheritedPathError(
                    f'InheritedBackbone: the s2t head of teacher '
                    f'{self.teacher!r} level {path.level} reads '
                    f'{path.in_dim} channels, student map {lv} has '
                    f'{x.shape[1]}')
            size = None if f == 1.0 else \
                tuple(math.ceil(n * f) for n in x.shape[-2:])
            # contiguous NCHW: mmcv's RoI ops read any map as NCHW memory
            out.append(path(x, size).contiguous())
        return tuple(out)

    def forward_features(self, x: Tensor) -> FeatureOutput:
        """The student's summaries and the teacher-space maps.

        Args:
            x (Tensor): images ``(B, 3, H, W)`` as the student takes them.

        Returns:
            FeatureOutput: the student's ``summary`` (and ``summaries``);
            ``features`` = one map per teacher level ``l`` of
            ``out_indices``, ``(B, D_l, h, w)`` at the grid of student map
            ``student_levels[l]`` times ``scale_factors[l]``.
        """
        out = self.backbone.forward_features(x)
        return FeatureOutput(out.summary,
                             self._to_teacher(dict(enumerate(out.features))),
                             out.summaries)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Toolbox interface: the teacher-space maps (see
        :meth:`forward_features`), for an mmdet / mmseg neck or head.

        A student whose own ``forward`` gives its pyramid
        (``out_type='pyramid'``, ``out_indices`` holding every level in
        ``student_levels``) runs only that, as in any detector: no
        summaries, no patch-grid level. Any other runs
        :meth:`forward_features`.
        """
        indices = getattr(self.backbone, 'out_indices', ())
        if getattr(self.backbone, 'out_type', None) == 'pyramid' and \
                set(self.student_levels) <= set(indices):
            return self._to_teacher(dict(zip(indices, self.backbone(x))))
        return self._to_teacher(
            dict(enumerate(self.backbone.forward_features(x).features)))
