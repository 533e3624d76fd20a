"""Report the unreadable images a training run skipped."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

from mmengine.dist import all_gather_object
from mmengine.hooks import Hook

from kiv.datasets.transforms import SKIPPED_FILES
from kiv.registry import HOOKS


def skipped_files_in_batch(data_batch: Optional[dict]) -> Iterable[str]:
    """Paths in the ``skipped_files`` metainfo of a batch's data samples.

    Args:
        data_batch (dict, optional): a collated batch whose ``data_samples``
            is a sequence of :class:`~mmengine.structures.BaseDataElement`
            (``pseudo_collate`` / ``default_collate`` keep them as a list).

    Returns:
        Iterable[str]: the paths, possibly with repeats.
    """
    if not isinstance(data_batch, dict):
        return ()
    samples = data_batch.get('data_samples')
    if not isinstance(samples, Sequence):
        return ()
    return (path for sample in samples
            for path in getattr(sample, 'metainfo', {}).get(SKIPPED_FILES, ()))


@HOOKS.register_module()
class BadImageReportHook(Hook):
    """Log how many unreadable images were skipped, once per period.

    :class:`~kiv.datasets.UnlabeledImageDataset` replaces an unreadable file
    by the next readable one and records the file in the sample's
    ``skipped_files`` metainfo. This hook collects those paths from every
    training batch (``after_train_iter``) and, at the end of each period,
    gathers them from all ranks and

    - logs ONE warning line with the number of distinct skipped files and
      the first ``max_paths`` of them (sorted), when there were any;
    - records the number as ``train/skipped_images`` in the message hub
      (also when it is 0, so the curve is continuous).

    Periods: every train epoch (``after_train_epoch``). mmengine's
    iteration-based loop treats the whole run as one epoch, so there the
    report comes at the end of training; set ``interval`` to also report
    every ``interval`` train iterations (in either loop). A report is only
    made when iterations ran since the last one; the decision depends on
    iteration counts alone, so every rank joins the same collectives.

    The count is the number of distinct files per period: a bad file met in
    several batches (or on several ranks) counts once.

    Args:
        interval (int, optional): also report every ``interval`` train
            iterations. Defaults to None (only at epoch ends).
        max_paths (int): how many paths the warning line shows. Defaults
            to 5.
    """

    priority = 'NORMAL'

    def __init__(self,
                 interval: Optional[int] = None,
                 max_paths: int = 5) -> None:
        if interval is not None and (not isinstance(interval, int)
                                     or interval <= 0):
            raise ValueError('BadImageReportHook: interval must be a '
                             f'positive int or None, got {interval!r}')
        if not isinstance(max_paths, int) or max_paths < 0:
            raise ValueError('BadImageReportHook: max_paths must be an int '
                             f'>= 0, got {max_paths!r}')
        self.interval = interval
        self.max_paths = max_paths
        self._paths: set[str] = set()
        self._first_iter = 0  # 1-based first iteration of the period
        self._num_iters = 0  # iterations since the last report

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Optional[dict] = None,
                         outputs: Optional[dict] = None) -> None:
        """Collect the batch's skipped files; report every ``interval``."""
        if self._num_iters == 0:
            self._first_iter = runner.iter + 1
        self._num_iters += 1
        self._paths.update(skipped_files_in_batch(data_batch))
        if self.interval is not None and self.every_n_train_iters(
                runner, self.interval):
            self._report(runner, last_iter=runner.iter + 1)

    def after_train_epoch(self, runner) -> None:
        """Report what the epoch (or the rest of it) skipped."""
        if self._num_iters > 0:
            self._report(runner, last_iter=runner.iter)

    def _report(self, runner, last_iter: int) -> None:
        """Gather the paths from all ranks, log and record the count.

        Args:
            runner (Runner): the runner.
            last_iter (int): 1-based last iteration of the period.
        """
        gathered = all_gather_object(sorted(self._paths))
        paths = sorted(set().union(*gathered))
        num = len(paths)
        runner.message_hub.update_scalar('train/skipped_images', num)
        if num:
            shown = ', '.join(paths[:self.max_paths])
            more = (f' (+{num - self.max_paths} more)'
                    if num > self.max_paths else '')
            runner.logger.warning(
                f'BadImageReportHook: {num} unreadable image file(s) '
                f'skipped in train iterations {self._first_iter}-'
                f'{last_iter}: {shown}{more}')
        self._paths.clear()
        self._num_iters = 0
