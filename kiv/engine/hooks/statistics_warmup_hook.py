"""Estimate the shared latent space's statistics before distillation."""
from __future__ import annotations

import itertools
import time
from typing import Optional

import torch
from mmengine.dataset import DefaultSampler
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch.utils.data import DataLoader

from kiv.models.connectors.shared_latent_space import all_reduce_sums
from kiv.registry import HOOKS
from ..random_state import preserved_random_state


@HOOKS.register_module()
class StatisticsWarmupHook(Hook):
    """Fix the standardiser statistics from a teacher-only pass.

    Before the first training iteration, runs the teachers (not the
    student) over ``num_batches`` batches of the training dataloader, at
    most one epoch (a fresh iterator: the training loop's own data order is
    unchanged), sums the exact per-output statistics on every rank,
    all-reduces them once and fixes them in the model
    (``KnowledgeInheritance.load_statistics``): PHI-S is computed once, the
    targets never move under the student, and the base teacher's heads
    start as its standardiser (knowledge preservation through the losses).

    The pass leaves the global random state as it found it (Python
    ``random``, NumPy, torch CPU and CUDA generators): its random
    augmentations draw from the global state and are undone afterwards, and
    its loader's base seed comes from a generator of its own, seeded with
    the run's sampler seed. Training therefore continues exactly as in a
    run that skips the warm-up, which is what a resumed run does (its
    statistics are in the checkpoint): resuming from a checkpoint gives the
    same weights as the uninterrupted run.

    Does nothing when the statistics are already fixed: resumed runs (the
    statistics are in the checkpoint), runs from a teacher-feature cache
    (exact statistics of the whole cache), or ``statistics='ema'``.

    Args:
        num_batches (int): batches of the warm-up pass per rank. With
            ``b`` images per batch and ``n`` ranks the statistics cover
            ``num_batches * b * n`` images; PHI-S of a ``C``-channel summary
            needs well over ``C`` of them. Defaults to 50.
    """

    priority = 'HIGH'

    def __init__(self, num_batches: int = 50) -> None:
        if num_batches < 1:
            raise ValueError(f'StatisticsWarmupHook: num_batches must be '
                             f'>= 1, got {num_batches}')
        self.num_batches = int(num_batches)

    def _warmup_loader(self, train_loader: DataLoader) -> DataLoader:
        """A loader of the training data for the warm-up pass.

        A separate, finite loader over the same dataset, pipeline, batch
        size, collate function, workers and worker seeding, sharded across
        ranks by mmengine's ``DefaultSampler`` (shuffled with the run's
        seed). Iterating the training loader itself would consume (and,
        when abandoned, close) the shared index stream of its
        ``InfiniteSampler``. Its iterator's base seed (which torch draws
        from the global generator unless the loader has its own) comes from
        a ``torch.Generator`` seeded with the same seed.

        Args:
            train_loader (DataLoader): the run's training dataloader.

        Returns:
            DataLoader: one epoch of the training data, in the warm-up's own
            order.
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

    def _sum_statistics(self, model: torch.nn.Module,
                        train_loader: DataLoader
                        ) -> tuple[Optional[dict[str, torch.Tensor]], int]:
        """This rank's summed statistics over the warm-up batches.

        Args:
            model (torch.nn.Module): the ``kiv.KnowledgeInheritance`` model
                (unwrapped).
            train_loader (DataLoader): the run's training dataloader.

        Returns:
            tuple: the packed sums per statistic key (None if the loader
            gave no batch) and the number of images they cover.
        """
        totals: Optional[dict[str, torch.Tensor]] = None
        images = 0
        batches = iter(self._warmup_loader(train_loader))
        try:
            for batch in itertools.islice(batches, self.num_batches):
                data = model.data_preprocessor(batch, False)
                sums = model.statistic_sums(data['inputs'],
                                            data.get('data_samples'))
                images += data['inputs'].shape[0]
                if totals is None:
                    totals = {k: v.clone() for k, v in sums.items()}
                else:
                    for key, value in sums.items():
                        totals[key] += value
        finally:
            del batches  # stops the workers of an abandoned epoch now
        return totals, images

    def before_train(self, runner) -> None:
        """Run the warm-up pass if the model's statistics are not fixed.

        Args:
            runner (mmengine.runner.Runner): the training runner.
        """
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        latent = getattr(model, 'latent', None)
        if latent is None or not hasattr(model, 'statistic_sums'):
            raise TypeError(
                'StatisticsWarmupHook needs a kiv.KnowledgeInheritance '
                f'model, got {type(model).__name__}')
        if latent.statistics != 'fixed' or latent.statistics_ready:
            return
        start = time.perf_counter()
        with preserved_random_state():
            totals, images = self._sum_statistics(model,
                                                  runner.train_dataloader)
        if totals is None:
            raise RuntimeError('StatisticsWarmupHook: the training '
                               'dataloader gave no batch')
        totals = all_reduce_sums(totals)
        model.load_statistics(totals)
        print_log(
            f'StatisticsWarmupHook: fixed the statistics of '
            f'{len(totals)} teacher outputs from {images} images per rank '
            f'in {time.perf_counter() - start:.1f} s', logger='current')
