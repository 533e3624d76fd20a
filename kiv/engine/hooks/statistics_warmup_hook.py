"""Estimate the shared latent space's statistics before distillation."""
from __future__ import annotations

import time
from typing import Optional

from mmengine.logging import print_log

from kiv.models.distillers.teacher_cache import fix_cache_statistics
from kiv.models.teachers import CachedTeacher
from kiv.registry import HOOKS
from .data_pass import SidePassHook


def _single_cache(model) -> Optional[str]:
    """The cache directory every teacher of ``model`` is read from, or
    None (an online teacher, or teachers of several caches)."""
    teachers = list(model.teachers.values())
    if not teachers or not all(isinstance(t, CachedTeacher)
                               for t in teachers):
        return None
    ids = {t.cache_id for t in teachers}
    return teachers[0].cache_dir if len(ids) == 1 else None


@HOOKS.register_module()
class StatisticsWarmupHook(SidePassHook):
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
    (exact statistics of the whole cache), or ``statistics='ema'``. When
    every teacher of the model is a ``kiv.CachedTeacher`` of one cache
    (whatever built them, e.g. a config with task heads, which
    ``KnowledgeInheritance(teacher_cache=...)`` refuses), it takes that
    cache's exact statistics instead of a pass: the sums the writer kept
    over every cached target.

    Args:
        num_batches (int): batches of the warm-up pass per rank. With
            ``b`` images per batch and ``n`` ranks the statistics cover
            ``num_batches * b * n`` images; PHI-S of a ``C``-channel summary
            needs well over ``C`` of them. Defaults to 50.
    """

    priority = 'HIGH'
    model_methods = ('statistic_sums', 'load_statistics')

    def before_train(self, runner) -> None:
        """Run the warm-up pass if the model's statistics are not fixed.

        Args:
            runner (mmengine.runner.Runner): the training runner.
        """
        model = self._distiller(runner)
        latent = model.latent
        if latent.statistics != 'fixed' or latent.statistics_ready:
            return
        cache_dir = _single_cache(model)
        if cache_dir is not None:
            fix_cache_statistics(model, cache_dir)
            print_log(f'StatisticsWarmupHook: every teacher is read from '
                      f'{cache_dir}: its exact statistics, no pass',
                      logger='current')
            return
        start = time.perf_counter()
        totals, images = self._summed(runner, model, model.statistic_sums)
        model.load_statistics(totals)
        print_log(
            f'StatisticsWarmupHook: fixed the statistics of '
            f'{len(totals)} teacher outputs from {images} images per rank '
            f'in {time.perf_counter() - start:.1f} s', logger='current')
