"""A teacher that reads its outputs from the teacher-feature cache."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from mmengine.model import BaseModule
from torch import Tensor

from kiv.fileio.teacher_cache_format import (CACHE_ID, CACHED_TARGETS,
                                             TeacherCacheError, output_keys,
                                             read_index)
from kiv.registry import MODELS
from kiv.structures import FeatureOutput
from .teacher import TeacherHeadMixin, precision_autocast

__all__ = ['CachedTeacher']


@MODELS.register_module()
class CachedTeacher(BaseModule, TeacherHeadMixin):
    """Stand-in for a :class:`~kiv.models.teachers.Teacher` whose outputs
    were computed once by ``tools/cache_teachers.py``.

    It holds no weights: :meth:`forward` stacks the targets that
    :class:`~kiv.datasets.TeacherCacheDataset` attached to the batch's data
    samples and returns them as float32, exactly what the online teacher
    returned for the same view (up to the cache's storage precision).
    ``kiv.KnowledgeInheritance`` passes the data samples to every teacher
    with ``reads_cache = True``, and builds one in place of each of its
    teachers when it is given ``teacher_cache`` (after checking the teacher
    configs against the cache), so a cached config needs no rewriting by
    any tool (docs/teacher_cache.md).

    The interface of :class:`~kiv.models.teachers.Teacher` that the
    distiller and the latent space read is kept: ``summary_dim`` (int or
    None), ``feature_dims``, ``feature_strides``, ``head_layer`` and
    ``head_input`` (None without ``head_from``), and
    :meth:`~kiv.models.teachers.Teacher.forward_head` (the kept head).

    Args:
        cache_dir (str): the cache directory (``index.json``).
        name (str): the teacher's name in the cache.
        head_from (dict, optional): the real teacher's ``kiv.Teacher``
            config, when its kept head is needed (logit distillation through
            the head, ``kiv.LogitDistillationLoss``): the teacher is built
            once, its head kept (frozen, in its precision) and the rest
            dropped. Its outputs must have the cached shapes. Defaults to
            None (nothing built, no weight file opened).
        init_cfg (dict, optional): unused (nothing to initialise).
    """

    #: ``kiv.KnowledgeInheritance`` calls ``teacher(images, data_samples=)``
    reads_cache = True

    def __init__(self, cache_dir: str, name: str,
                 head_from: dict | None = None,
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg=None)
        index = read_index(cache_dir)
        teachers = index['teachers']
        if name not in teachers:
            raise TeacherCacheError(
                f'CachedTeacher: teacher {name!r} is not in the cache '
                f'{cache_dir}, which holds {list(teachers)}')
        entry = teachers[name]
        self.cache_dir = cache_dir
        self.name = name
        self.cache_id: str = index['cache_id']
        self.summary_dim: int | None = entry['summary_dim']
        self.feature_dims: list[int] = list(entry['feature_dims'])
        self.feature_strides: list[int] = list(entry['feature_strides'])
        self.grids: list[tuple[int, int]] = [tuple(g)
                                             for g in entry['grids']]
        self.head_layer = None
        self.head_input = None
        self.kept_head: torch.nn.Module | None = None
        self.compute_dtype = 'fp32'
        if head_from is not None:
            self._keep_head(head_from)
        self.keys = output_keys(name, self.summary_dim is not None,
                                len(self.feature_dims))
        self._shapes = {}
        if self.summary_dim is not None:
            self._shapes[f'{name}.summary'] = (self.summary_dim, )
        for i, (dim, grid) in enumerate(zip(self.feature_dims, self.grids)):
            self._shapes[f'{name}.features.{i}'] = (dim, *grid)
        self._is_init = True
        self.train(False)

    def _keep_head(self, cfg: dict) -> None:
        """Build the real teacher of ``cfg`` and keep its head only."""
        teacher = MODELS.build(cfg)
        if teacher.head_layer is None:
            raise TeacherCacheError(
                f'CachedTeacher {self.name!r}: head_from is a teacher without '
                "a kept head (give it head=dict(layer=..., input=...))")
        if (teacher.summary_dim != self.summary_dim
                or list(teacher.feature_dims) != self.feature_dims):
            raise TeacherCacheError(
                f'CachedTeacher {self.name!r}: head_from gives summary_dim='
                f'{teacher.summary_dim}, feature_dims='
                f'{list(teacher.feature_dims)}; the cache {self.cache_dir} '
                f'holds {self.summary_dim}, {self.feature_dims}')
        self.head_layer = teacher.head_layer
        self.head_input = teacher.head_input
        self.compute_dtype = teacher.compute_dtype
        self.kept_head = teacher.head.requires_grad_(False).eval()

    @property
    def head(self) -> torch.nn.Module | None:
        """The real teacher's kept head (``head_from``), or None."""
        return self.kept_head

    def _head_autocast(self) -> torch.autocast:
        """The teacher's own precision (its ``dtype``) on the head's
        device."""
        device = next(self.kept_head.parameters(),
                      torch.empty(0)).device.type
        return precision_autocast(self.compute_dtype, device)

    def train(self, mode: bool = True) -> CachedTeacher:
        """Stay in eval mode (like a frozen teacher).

        Returns:
            CachedTeacher: self.
        """
        return super().train(False)

    def init_weights(self) -> None:
        """Nothing to initialise."""

    def _stack(self, data_samples: Sequence[Any], key: str,
               device: torch.device) -> Tensor:
        rows = []
        for i, sample in enumerate(data_samples):
            targets = sample.get(CACHED_TARGETS) if sample is not None \
                else None
            if targets is None or key not in targets:
                raise TeacherCacheError(
                    f'CachedTeacher {self.name!r}: data sample {i} of the '
                    f'batch has no cached target {key!r}; train from '
                    'kiv.TeacherCacheDataset of the cache '
                    f'{self.cache_dir} (docs/teacher_cache.md)')
            value = targets[key]
            if tuple(value.shape) != self._shapes[key]:
                raise TeacherCacheError(
                    f'CachedTeacher {self.name!r}: cached target {key!r} of '
                    f'data sample {i} has shape {tuple(value.shape)}, the '
                    f'cache index says {self._shapes[key]}')
            rows.append(value)
        # autocast off: under CPU bf16 autocast ``stack`` of fp16 rows fails
        # ("Unexpected floating ScalarType in at::autocast::prioritize"),
        # and the targets are float32 whatever the caller's autocast
        with torch.autocast(device.type, enabled=False):
            return torch.stack(rows).to(device=device, dtype=torch.float32,
                                        non_blocking=True)

    @torch.no_grad()
    def forward(self, inputs: Tensor,
                data_samples: Sequence[Any] | None = None) -> FeatureOutput:
        """The cached outputs of the batch's views.

        Args:
            inputs (Tensor): ``(B, 3, H, W)`` images (used for the batch
                size and device only).
            data_samples (Sequence): the batch's data samples from
                :class:`~kiv.datasets.TeacherCacheDataset`.

        Returns:
            FeatureOutput: ``summary`` ``(B, summary_dim)`` (None if the
            teacher has none) and ``features``, one ``(B, feature_dims[l],
            h_l, w_l)`` float32 map per level.

        Raises:
            TeacherCacheError: no data samples (e.g. validation on plain
                images, which needs the real teacher), samples of another
                cache, or missing targets.
        """
        if data_samples is None:
            raise TeacherCacheError(
                f'CachedTeacher {self.name!r} reads its outputs from the '
                'data samples of kiv.TeacherCacheDataset and cannot run on '
                'images alone; validation and inherited heads need the real '
                'teacher (kiv.Teacher)')
        if len(data_samples) != inputs.shape[0]:
            raise ValueError(f'CachedTeacher {self.name!r}: {inputs.shape[0]}'
                             f' images but {len(data_samples)} data samples')
        for i, sample in enumerate(data_samples):
            got = sample.metainfo.get(CACHE_ID) if sample is not None \
                else None
            if got != self.cache_id:
                raise TeacherCacheError(
                    f'CachedTeacher {self.name!r}: data sample {i} comes from '
                    f'cache {got!r}, this teacher reads cache '
                    f'{self.cache_id!r} ({self.cache_dir})')
        tensors = [self._stack(data_samples, key, inputs.device)
                   for key in self.keys]
        summary = tensors.pop(0) if self.summary_dim is not None else None
        return FeatureOutput(summary, tuple(tensors))

    def extra_repr(self) -> str:
        return (f'name={self.name!r}, cache_dir={self.cache_dir!r}, '
                f'summary_dim={self.summary_dim}, '
                f'feature_dims={self.feature_dims}')
