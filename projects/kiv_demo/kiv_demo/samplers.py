"""Batches with a fixed share of labelled images.

The inheritance run distils on the user's images, of which only a small
split is labelled. :class:`LabelledShareSampler` makes every batch hold the
same number of labelled views (which also feed the multi-task heads) next
to unlabelled ones (distillation only), so the task heads' cost and signal
per step are fixed, and the data-centric rivals can be given exactly the
labelled views per step the inherited student gets.
"""
from __future__ import annotations

import os.path as osp
from typing import Iterator, Optional

import numpy as np
from mmengine.dataset import BaseDataset
from mmengine.dist import get_dist_info, sync_random_seed
from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import Registry
from torch.utils.data import Sampler

from .transforms import WorldViewLabels

__all__ = ['DATA_SAMPLERS', 'LabelledShareSampler', 'labelled_indices']

DATA_SAMPLERS = Registry('data sampler', parent=MMENGINE_DATA_SAMPLERS,
                         scope='kiv_demo', locations=['kiv_demo'])


def _img_path(dataset, idx: int) -> str:
    if hasattr(dataset, 'sample_info'):  # kiv.TeacherCacheDataset
        return dataset.sample_info(idx)['img_path']
    if isinstance(dataset, BaseDataset):
        return dataset.get_data_info(idx)['img_path']
    raise TypeError(f'{type(dataset).__name__}: cannot tell which samples '
                    'are labelled (needs sample_info or get_data_info)')


def labelled_indices(dataset) -> np.ndarray:
    """Indices of the samples whose image has a world label map.

    Returns:
        np.ndarray: ``(N_labelled,)`` int64, ascending.
    """
    out = []
    for idx in range(len(dataset)):
        path = WorldViewLabels.label_path(_img_path(dataset, idx))
        if path is not None and osp.isfile(path):
            out.append(idx)
    return np.asarray(out, np.int64)


@DATA_SAMPLERS.register_module()
class LabelledShareSampler(Sampler):
    """Infinite sampler: every ``batch_size`` consecutive indices hold
    ``labelled_per_batch`` labelled samples, then unlabelled ones.

    Each pool is shuffled anew every time it is used up (seeded, like
    mmengine's ``InfiniteSampler``), so every labelled view is seen equally
    often. With several ranks, rank ``r`` takes every ``world_size``-th
    batch of the same stream.

    Args:
        dataset: a ``kiv.TeacherCacheDataset`` or an mmengine dataset with
            ``img_path`` in its data infos.
        batch_size (int): the loader's batch size.
        labelled_per_batch (int): labelled samples per batch
            (``0 < labelled_per_batch <= batch_size``).
        seed (int, optional): shuffling seed; defaults to a seed synced
            over ranks.

    Raises:
        ValueError: no labelled samples, or no unlabelled ones while the
            batch needs them.
    """

    def __init__(self, dataset, batch_size: int, labelled_per_batch: int,
                 seed: Optional[int] = None) -> None:
        if not 0 < labelled_per_batch <= batch_size:
            raise ValueError(f'labelled_per_batch={labelled_per_batch} must '
                             f'be in 1..batch_size ({batch_size})')
        self.batch_size = int(batch_size)
        self.labelled_per_batch = int(labelled_per_batch)
        self.seed = sync_random_seed() if seed is None else int(seed)
        self.rank, self.world_size = get_dist_info()
        self.labelled = labelled_indices(dataset)
        mask = np.ones(len(dataset), bool)
        mask[self.labelled] = False
        self.unlabelled = np.nonzero(mask)[0]
        if not len(self.labelled):
            raise ValueError('LabelledShareSampler: the dataset has no '
                             'labelled sample')
        if batch_size > labelled_per_batch and not len(self.unlabelled):
            raise ValueError('LabelledShareSampler: the dataset has no '
                             'unlabelled sample')

    @staticmethod
    def _pool(indices: np.ndarray,
              rng: np.random.Generator) -> Iterator[int]:
        while True:
            yield from indices[rng.permutation(len(indices))].tolist()

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seed)
        labelled = self._pool(self.labelled, rng)
        unlabelled = self._pool(self.unlabelled, rng)
        n_unl = self.batch_size - self.labelled_per_batch
        batch = 0
        while True:
            items = [next(labelled) for _ in range(self.labelled_per_batch)]
            items += [next(unlabelled) for _ in range(n_unl)]
            if batch % self.world_size == self.rank:
                yield from items
            batch += 1

    def __len__(self) -> int:
        return len(self.labelled) + len(self.unlabelled)

    def set_epoch(self, epoch: int) -> None:
        """Not used: the stream is infinite."""
