"""Measure the inherited outputs' statistics at the end of distillation."""
from __future__ import annotations

import time

from mmengine.logging import print_log

from kiv.registry import HOOKS
from .data_pass import SidePassHook


@HOOKS.register_module()
class InheritedCalibrationHook(SidePassHook):
    """Fill the label-free calibration of the inherited heads.

    After the last training iteration, and before that iteration's
    checkpoint is written (this hook's priority is above
    ``CheckpointHook``'s), runs the distilled student in eval mode over
    ``num_batches`` batches of the training data (a side pass in its own
    order, :func:`~kiv.engine.hooks.data_pass.side_loader`), sums the
    per-channel statistics of every inherited output (student -> s2t head
    -> inverse standardisation) on every rank, all-reduces them once and
    stores them in the shared latent space
    (``KnowledgeInheritance.load_calibration``). The checkpoint, and an
    export with ``--keep-heads``, then carry them:
    ``to_teacher_space(..., calibrated=True)``, ``kiv.InheritedPath`` and
    ``kiv.InheritedBackbone`` with ``calibrate=True`` map each channel
    of an inherited output onto its teacher's mean and standard deviation
    (:mod:`kiv.models.connectors.calibration`). No label is read.

    The pass changes no weight and leaves the global random state as it
    found it, so the trained student is the same with or without this hook.
    Does nothing (with a log line) when the latent space has no output to
    calibrate (``standardize='none'``).

    Args:
        num_batches (int): batches of the pass per rank (at most one
            epoch). Defaults to 50.
    """

    priority = 'NORMAL'  # above CheckpointHook's VERY_LOW
    model_methods = ('calibration_sums', 'load_calibration')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        """At the last training iteration, measure and store the inherited
        outputs' statistics.

        Args:
            runner (mmengine.runner.Runner): the training runner.
        """
        if not self.is_last_train_iter(runner):
            return
        model = self._distiller(runner)
        if not model.latent.calibration_keys():
            print_log('InheritedCalibrationHook: no output to calibrate '
                      f'(standardize={model.latent.standardize!r})',
                      logger='current')
            return
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            totals, images = self._summed(runner, model,
                                          model.calibration_sums)
        finally:
            model.train(was_training)
        model.load_calibration(totals)
        print_log(
            f'InheritedCalibrationHook: calibrated {len(totals)} inherited '
            f'outputs from {images} images per rank in '
            f'{time.perf_counter() - start:.1f} s', logger='current')
