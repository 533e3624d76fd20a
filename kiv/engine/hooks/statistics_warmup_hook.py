"""Estimate the shared latent space's statistics before distillation."""
from __future__ import annotations

import itertools
import time
from typing import Iterator, Optional

import torch
from mmengine.dataset import DefaultSampler
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch.utils.data import DataLoader

from kiv.models.necks.shared_latent_space import all_reduce_sums
from kiv.registry import HOOKS


@HOOKS.register_module()
class StatisticsWarmupHook(Hook):
    """Fix the standardiser statistics from a teacher-only pass.

    Before the first training iteration, runs the teachers (not the
    student) over ``num_batches`` batches of the training dataloader, at
    most one epoch (a fresh iterator: the training loop's own data order is
    unchanged), sums
    the exact per-output statistics on every rank, all-reduces them once
    and fixes them in the model (``KnowledgeInheritance.load_statistics``):
    PHI-S is computed once, the targets never move under the student, and
    the base teacher's heads start as its standardiser (knowledge
    preservation through the losses).

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

    def _warmup_loader(self, train_loader: DataLoader) -> Iterator:
        """At most ``num_batches`` batches (one epoch) of the training data.

        A separate, finite loader over the same dataset, pipeline, batch size
        and collate function, sharded across ranks by mmengine's
        ``DefaultSampler`` (shuffled with the run's seed). Iterating the
        training loader itself would consume (and, when abandoned, close)
        the shared index stream of its ``InfiniteSampler``.
        """
        dataset = train_loader.dataset
        seed = getattr(train_loader.sampler, 'seed', None)
        loader = DataLoader(
            dataset,
            batch_size=train_loader.batch_size,
            sampler=DefaultSampler(dataset, shuffle=True, seed=seed),
            num_workers=train_loader.num_workers,
            collate_fn=train_loader.collate_fn,
            worker_init_fn=train_loader.worker_init_fn)
        return itertools.islice(loader, self.num_batches)

    def before_train(self, runner) -> None:
        """Run the warm-up pass if the model's statistics are not fixed."""
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
        totals: Optional[dict[str, torch.Tensor]] = None
        images = 0
        for batch in self._warmup_loader(runner.train_dataloader):
            data = model.data_preprocessor(batch, False)
            sums = model.statistic_sums(data['inputs'],
                                        data.get('data_samples'))
            images += data['inputs'].shape[0]
            if totals is None:
                totals = {k: v.clone() for k, v in sums.items()}
            else:
                for key, value in sums.items():
                    totals[key] += value
        if totals is None:
            raise RuntimeError('StatisticsWarmupHook: the training '
                               'dataloader gave no batch')
        totals = all_reduce_sums(totals)
        model.load_statistics(totals)
        print_log(
            f'StatisticsWarmupHook: fixed the statistics of '
            f'{len(totals)} teacher outputs from {images} images per rank '
            f'in {time.perf_counter() - start:.1f} s', logger='current')
