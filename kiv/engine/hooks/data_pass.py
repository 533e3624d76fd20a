"""A side pass over the training data, for hooks that sum statistics.

``kiv.StatisticsWarmupHook`` (the teachers' statistics, before step 0) and
``kiv.InheritedCalibrationHook`` (the inherited outputs' statistics, after
the last step) both run the model over some batches of the training data
without touching the training loop's own data order
(:class:`SidePassHook`).
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional

import torch
from mmengine.dataset import DefaultSampler
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from torch import Tensor
from torch.utils.data import DataLoader

from kiv.models.connectors.shared_latent_space import all_reduce_sums
from ..random_state import preserved_random_state

__all__ = ['side_loader', 'sum_over_batches', 'SidePassHook']


def side_loader(train_loader: DataLoader) -> DataLoader:
    """A loader of the training data for a side pass.

    A separate, finite loader over the same dataset, pipeline, batch size,
    collate function, workers and worker seeding, sharded across ranks by
    mmengine's ``DefaultSampler`` (shuffled with the run's seed). Iterating
    the training loader itself would consume (and, when abandoned, close)
    the shared index stream of its ``InfiniteSampler``. Its iterator's base
    seed (which torch draws from the global generator unless the loader has
    its own) comes from a ``torch.Generator`` seeded with the same seed.

    Args:
        train_loader (DataLoader): the run's training dataloader.

    Returns:
        DataLoader: one epoch of the training data, in the pass's own order.
    """
    dataset = train_loader.dataset
    seed = getattr(train_loader.sampler, 'seed', None)
    sampler = DefaultSampler(dataset, shuffle=True, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(int(sampler.seed))
    return DataLoader(
        dataset,
        batch_size=train_loader.batch_size,
        sampler=sampler,
        num_workers=train_loader.num_workers,
        collate_fn=train_loader.collate_fn,
        worker_init_fn=train_loader.worker_init_fn,
        multiprocessing_context=train_loader.multiprocessing_context,
        generator=generator)


def sum_over_batches(model: torch.nn.Module, train_loader: DataLoader,
                     num_batches: int,
                     batch_sums: Callable[[Tensor, Optional[list]],
                                          dict[str, Tensor]]
                     ) -> tuple[Optional[dict[str, Tensor]], int]:
    """This rank's packed sums over the first batches of a side pass.

    Args:
        model (torch.nn.Module): the (unwrapped) model; its
            ``data_preprocessor`` prepares each batch.
        train_loader (DataLoader): the run's training dataloader
            (:func:`side_loader` makes the pass's own).
        num_batches (int): batches summed (at most one epoch).
        batch_sums (callable): ``(inputs, data_samples) -> {key: packed
            float64 sums}`` of one batch.

    Returns:
        tuple: the summed sums per key (None if the loader gave no batch)
        and the number of images they cover.
    """
    totals: Optional[dict[str, Tensor]] = None
    images = 0
    batches = iter(side_loader(train_loader))
    try:
        for batch in itertools.islice(batches, num_batches):
            data = model.data_preprocessor(batch, False)
            sums = batch_sums(data['inputs'], data.get('data_samples'))
            images += data['inputs'].shape[0]
            if totals is None:
                totals = {k: v.clone() for k, v in sums.items()}
            else:
                for key, value in sums.items():
                    totals[key] += value
    finally:
        del batches  # stops the workers of an abandoned epoch now
    return totals, images


class SidePassHook(Hook):
    """Base of the hooks that sum statistics over a side pass and give
    them to a ``kiv.KnowledgeInheritance``.

    The pass (:func:`sum_over_batches`) leaves the global random state as
    it found it (Python ``random``, NumPy, torch CPU and CUDA generators):
    its random augmentations draw from the global state and are undone
    afterwards, and its loader's base seed comes from a generator of its
    own. The sums are all-reduced once over ranks.

    Args:
        num_batches (int): batches of the pass per rank (at most one
            epoch). Defaults to 50.
    """

    #: model methods a subclass calls (checked, named in the error)
    model_methods: tuple[str, ...] = ()

    def __init__(self, num_batches: int = 50) -> None:
        if num_batches < 1:
            raise ValueError(f'{type(self).__name__}: num_batches must be '
                             f'>= 1, got {num_batches}')
        self.num_batches = int(num_batches)

    def _distiller(self, runner) -> torch.nn.Module:
        """The runner's (unwrapped) ``kiv.KnowledgeInheritance``.

        Raises:
            TypeError: another model.
        """
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        if getattr(model, 'latent', None) is None or not all(
                hasattr(model, m) for m in self.model_methods):
            raise TypeError(f'{type(self).__name__} needs a '
                            'kiv.KnowledgeInheritance model, got '
                            f'{type(model).__name__}')
        return model

    def _summed(self, runner, model: torch.nn.Module,
                batch_sums: Callable[[Tensor, Optional[list]],
                                     dict[str, Tensor]]
                ) -> tuple[dict[str, Tensor], int]:
        """Sums over the pass on every rank, all-reduced, and the images
        per rank they cover.

        Raises:
            RuntimeError: the training dataloader gave no batch.
        """
        with preserved_random_state():
            totals, images = sum_over_batches(
                model, runner.train_dataloader, self.num_batches, batch_sums)
        if totals is None:
            raise RuntimeError(f'{type(self).__name__}: the training '
                               'dataloader gave no batch')
        return all_reduce_sums(totals), images
