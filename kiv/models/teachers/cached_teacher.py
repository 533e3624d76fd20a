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

__all__ = ['CachedTeacher']


@MODELS.register_module()
class CachedTeacher(BaseModule):
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
    None), ``feature_dims``, ``feature_strides``, ``head_layer = None``
    (a cached teacher has no inherited head), ``head_input = None``.

    Args:
        cache_dir (str): the cache directory (``index.json``).
        name (str): the teacher's name in the cache.
        init_cfg (dict, optional): unused (nothing to initialise).
    """

    #: ``kiv.KnowledgeInheritance`` calls ``teacher(images, data_samples=)``
    reads_cache = True

    def __init__(self, cache_dir: str, name: str,
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
        self.keys = output_keys(name, self.summary_dim is not None,
                                len(self.feature_dims))
        self._shapes = {}
        if self.summary_dim is not None:
            self._shapes[f'{name}.summary'] = (self.summary_dim, )
        for i, (dim, grid) in enumerate(zip(self.feature_dims, self.grids)):
            self._shapes[f'{name}.features.{i}'] = (dim, *grid)
        self._is_init = True
        self.train(False)

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

    def forward_head(self, inputs: Any) -> Any:
        """A cached teacher keeps no head.

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError(f'CachedTeacher {self.name!r} has no head; '
                           'inherited heads need the real teacher')

    def extra_repr(self) -> str:
        return (f'name={self.name!r}, cache_dir={self.cache_dir!r}, '
                f'summary_dim={self.summary_dim}, '
                f'feature_dims={self.feature_dims}')
