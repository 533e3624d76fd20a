"""Report the image files a training run skipped, and why."""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

from mmengine.dist import all_gather_object
from mmengine.hooks import Hook

from kiv.datasets.transforms import SKIP_CAUSES, SKIPPED_FILES
from kiv.registry import HOOKS

#: cause of a skip recorded without one (older data samples)
UNKNOWN_CAUSE = 'unknown'


def skipped_in_batch(
        data_batch: Optional[dict]) -> Iterable[Tuple[str, str]]:
    """``(path, cause)`` of the files skipped to build a batch's samples.

    Args:
        data_batch (dict, optional): a collated batch whose ``data_samples``
            is a sequence of :class:`~mmengine.structures.BaseDataElement`
            (``pseudo_collate`` / ``default_collate`` keep them as a list).

    Returns:
        Iterable[tuple[str, str]]: the pairs, possibly with repeats; the
        cause is ``'unknown'`` when a sample has no ``skip_causes``.
    """
    if not isinstance(data_batch, dict):
        return ()
    samples = data_batch.get('data_samples')
    if not isinstance(samples, Sequence):
        return ()
    pairs = []
    for sample in samples:
        meta = getattr(sample, 'metainfo', {})
        paths = list(meta.get(SKIPPED_FILES, ()))
        causes = list(meta.get(SKIP_CAUSES, ()))
        causes += [UNKNOWN_CAUSE] * (len(paths) - len(causes))
        pairs.extend(zip(paths, causes))
    return pairs


def skipped_files_in_batch(data_batch: Optional[dict]) -> Iterable[str]:
    """Paths in the ``skipped_files`` metainfo of a batch's data samples.

    Args:
        data_batch (dict, optional): see :func:`skipped_in_batch`.

    Returns:
        Iterable[str]: the paths, possibly with repeats.
    """
    return [path for path, _ in skipped_in_batch(data_batch)]


def _by_cause(skipped: Dict[str, str]) -> str:
    """``'not decodable: 2, missing file: 1'`` (most frequent first)."""
    counts = Counter(skipped.values())
    return ', '.join(f'{cause}: {num}'
                     for cause, num in sorted(counts.items(),
                                              key=lambda kv: (-kv[1], kv[0])))


def _find_scan_skipped(dataset: Any, depth: int = 0) -> Dict[str, list]:
    """``scan_skipped`` of a dataset, looking inside dataset wrappers.

    Args:
        dataset: the train dataset (possibly ``ConcatDataset``,
            ``RepeatDataset``, ``ClassBalancedDataset`` ...).
        depth (int): recursion depth (wrappers of wrappers).

    Returns:
        dict[str, list]: ``cause -> paths`` merged over the datasets.
    """
    found: Dict[str, list] = {}
    if dataset is None or depth > 8:
        return found
    for cause, paths in (getattr(dataset, 'scan_skipped', None) or {}).items():
        found.setdefault(cause, []).extend(paths)
    inner = list(getattr(dataset, 'datasets', None) or [])
    if getattr(dataset, 'dataset', None) is not None:
        inner.append(dataset.dataset)
    for sub in inner:
        for cause, paths in _find_scan_skipped(sub, depth + 1).items():
            found.setdefault(cause, []).extend(paths)
    return found


@HOOKS.register_module()
class BadImageReportHook(Hook):
    """Log how many image files were skipped, why, once per period and
    once for the whole run.

    :class:`~kiv.datasets.UnlabeledImageDataset` replaces an unreadable file
    by the next readable one and records the file and its cause in the
    sample's ``skipped_files`` / ``skip_causes`` metainfo. This hook collects
    them from every training batch (``after_train_iter``) and, at the end of
    each period, gathers them from all ranks and

    - logs ONE warning line with the number of distinct skipped files, the
      count per cause and the first ``max_paths`` paths (sorted), when there
      were any;
    - records the number as ``train/skipped_images`` in the message hub
      (also when it is 0, so the curve is continuous).

    Periods: every train epoch (``after_train_epoch``). mmengine's
    iteration-based loop treats the whole run as one epoch, so there the
    report comes at the end of training; set ``interval`` to also report
    every ``interval`` train iterations (in either loop). A report is only
    made when iterations ran since the last one; the decision depends on
    iteration counts alone, so every rank joins the same collectives.

    At the end of training (``after_train``) one more line sums up the whole
    run: every cause with its count, both from the dataset's folder scan
    (``scan_skipped``: symlink loops, unreadable folders ...) and from
    loading (not decodable, too many pixels, missing file ...).

    The counts are numbers of distinct files: a bad file met in several
    batches (or on several ranks) counts once.

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
        self._skipped: Dict[str, str] = {}  # path -> cause, this period
        self._run_skipped: Dict[str, str] = {}  # whole run, all ranks
        self._first_iter = 0  # 1-based first iteration of the period
        self._num_iters = 0  # iterations since the last report

    def before_train(self, runner) -> None:
        """Start the run's tally."""
        self._run_skipped = {}

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Optional[dict] = None,
                         outputs: Optional[dict] = None) -> None:
        """Collect the batch's skipped files; report every ``interval``."""
        if self._num_iters == 0:
            self._first_iter = runner.iter + 1
        self._num_iters += 1
        for path, cause in skipped_in_batch(data_batch):
            self._skipped.setdefault(path, cause)
        if self.interval is not None and self.every_n_train_iters(
                runner, self.interval):
            self._report(runner, last_iter=runner.iter + 1)

    def after_train_epoch(self, runner) -> None:
        """Report what the epoch (or the rest of it) skipped."""
        if self._num_iters > 0:
            self._report(runner, last_iter=runner.iter)

    def after_train(self, runner) -> None:
        """Log the whole run's skipped files, every cause with its count."""
        if self._num_iters > 0:  # a run that stopped between periods
            self._report(runner, last_iter=runner.iter)
        dataset = getattr(runner.train_dataloader, 'dataset', None)
        scan = _find_scan_skipped(dataset)
        num_scan = sum(len(paths) for paths in scan.values())
        num_load = len(self._run_skipped)
        if not num_scan and not num_load:
            runner.logger.info('BadImageReportHook: no image file was '
                               'skipped in this run')
            return
        parts = []
        if num_scan:
            parts.append('at the folder scan: ' + ', '.join(
                f'{cause}: {len(paths)}'
                for cause, paths in sorted(scan.items())))
        if num_load:
            parts.append('at loading: ' + _by_cause(self._run_skipped))
        runner.logger.warning(
            f'BadImageReportHook: {num_scan + num_load} image file(s) or '
            f'folder(s) skipped in this run; ' + '; '.join(parts))

    def _report(self, runner, last_iter: int) -> None:
        """Gather the skips from all ranks, log and record the count.

        Args:
            runner (Runner): the runner.
            last_iter (int): 1-based last iteration of the period.
        """
        gathered = all_gather_object(sorted(self._skipped.items()))
        skipped: Dict[str, str] = {}
        for pairs in gathered:
            for path, cause in pairs:
                skipped.setdefault(path, cause)
        self._run_skipped.update(skipped)
        paths = sorted(skipped)
        num = len(paths)
        runner.message_hub.update_scalar('train/skipped_images', num)
        if num:
            shown = ', '.join(paths[:self.max_paths])
            more = (f' (+{num - self.max_paths} more)'
                    if num > self.max_paths else '')
            runner.logger.warning(
                f'BadImageReportHook: {num} unreadable image file(s) '
                f'skipped in train iterations {self._first_iter}-'
                f'{last_iter} ({_by_cause(skipped)}): {shown}{more}')
        self._skipped.clear()
        self._num_iters = 0
