"""Resume with the global random state of the interrupted run.

mmengine's ``--resume`` restores the weights, optimizer, schedulers and
message hub, and replays the data stream by skipping the batches already
trained (``IterBasedTrainLoop``), but none of the global random states:
Python ``random``, NumPy's global state and the torch (CPU, CUDA)
generators. Whatever the training step draws from them (drop path, dropout,
batch augmentations such as Mixup / CutMix, mmdet's proposal samplers, data
augmentation in the main process) then differs from the uninterrupted run.
``kiv.SafeCheckpointHook`` (through :class:`ResumeRandomState`) stores them
in every checkpoint and puts them back on resume at the exact point the
uninterrupted run was at: after the dataloader skip, right before the first
batch after the checkpoint is loaded. It also keeps validation from
drawing from the training's random state, so a validation that ran right
after the checkpoint in the uninterrupted run (and is not repeated by the
resumed run) changes nothing.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional

import numpy as np
import torch
from mmengine.dist import get_world_size
from mmengine.logging import print_log

__all__ = ['get_random_state', 'set_random_state', 'preserved_random_state',
           'ResumeRandomState']

#: checkpoint key of the saved states (one per rank)
CHECKPOINT_KEY = 'random_state'


def get_random_state() -> dict[str, Any]:
    """The process's global random states as plain data.

    Plain data (tensors, numbers, strings) loads with
    ``torch.load(weights_only=True)``.

    Returns:
        dict: ``python`` (``random``'s state), ``numpy`` (the global
        ``RandomState``), ``torch`` (CPU generator) and, when CUDA is
        initialised, ``cuda`` (every device's generator).
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(
        python=dict(version=int(version),
                    internal=torch.tensor(internal, dtype=torch.int64),
                    gauss=gauss),
        numpy=dict(kind=str(kind),
                   keys=torch.from_numpy(keys.astype(np.int64)),
                   pos=int(pos), has_gauss=int(has_gauss),
                   cached=float(cached)),
        torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    """Put back states taken by :func:`get_random_state`.

    Args:
        state (dict): output of :func:`get_random_state`.
    """
    py = state['python']
    random.setstate((py['version'],
                     tuple(int(v) for v in py['internal'].tolist()),
                     py['gauss']))
    npy = state['numpy']
    np.random.set_state((npy['kind'], npy['keys'].numpy().astype(np.uint32),
                         npy['pos'], npy['has_gauss'], npy['cached']))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state['cuda']]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class _RestoreBeforeBatch:
    """An iterator that calls ``restore`` before its ``(skip + 1)``-th item.

    Args:
        inner (Iterator): the training loop's dataloader iterator.
        skip (int): items fetched first without restoring (mmengine's
            resume-time skip of the batches already trained).
        restore (Callable[[], None]): called once, right before the next
            item is fetched.
    """

    def __init__(self, inner: Iterator, skip: int,
                 restore: Callable[[], None]) -> None:
        self.inner = inner
        self.skip = int(skip)
        self.restore: Optional[Callable[[], None]] = restore

    def __iter__(self) -> '_RestoreBeforeBatch':
        return self

    def __next__(self) -> Any:
        if self.skip > 0:
            self.skip -= 1
        elif self.restore is not None:
            restore, self.restore = self.restore, None
            restore()
        return next(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run a block without changing the process's global random states.

    Python ``random``, NumPy's global state, the torch CPU generator and the
    CUDA generators (if CUDA is initialised) are restored on exit, whatever
    the block drew from them (e.g. random data augmentation, a
    ``DataLoader`` iterator's base seed).

    Yields:
        None
    """
    state = get_random_state()
    try:
        yield
    finally:
        set_random_state(state)


class ResumeRandomState:
    """Save the global random states in checkpoints; restore them on resume.

    The hook methods of ``kiv.SafeCheckpointHook`` call these. On save the
    states of the saving process (rank 0: mmengine writes checkpoints there
    only) go into ``checkpoint['random_state']``. On ``--resume`` they are
    set right before the first batch after the checkpoint is fetched: with
    an ``IterBasedTrainLoop`` after mmengine's skip of the batches already
    trained (the skip draws the random augmentation of the skipped
    batches), with an ``EpochBasedTrainLoop`` before the first epoch's
    data iterator is made. Every rank takes rank 0's states, which is what
    every rank had when the ranks share one seed (mmengine's default); with
    ``randomness.diff_rank_seed=True`` nothing is restored (a warning says
    so). Validation runs on a copy of the random state and gives the
    training's back afterwards. Checkpoints without the key (older ones)
    resume as before.
    """

    def __init__(self) -> None:
        self._pending: Optional[dict[str, Any]] = None
        self._outside_val: Optional[dict[str, Any]] = None

    def save(self, checkpoint: dict) -> None:
        """Add the random states to a checkpoint about to be written.

        During validation (mmengine's ``save_best`` writes the best
        checkpoint and rewrites the last one there) the training's states
        kept at ``before_val`` are saved: training goes on from those, not
        from what validation drew.

        Args:
            checkpoint (dict): the checkpoint.
        """
        checkpoint[CHECKPOINT_KEY] = self._outside_val \
            if self._outside_val is not None else get_random_state()

    def load(self, runner, checkpoint: dict) -> None:
        """Keep the saved states of a resumed checkpoint for the restart.

        Args:
            runner (mmengine.runner.Runner): the runner.
            checkpoint (dict): the loaded checkpoint.
        """
        state = checkpoint.get(CHECKPOINT_KEY)
        if not state or not getattr(runner, '_resume', False):
            return
        randomness = getattr(runner, '_randomness_cfg', None) or {}
        if get_world_size() > 1 and randomness.get('diff_rank_seed'):
            print_log('SafeCheckpointHook: randomness.diff_rank_seed=True, '
                      'the random states are not restored (the checkpoint '
                      "holds rank 0's only)", logger='current',
                      level='WARNING')
            return
        self._pending = state

    def _restore(self) -> None:
        """Set the pending states (once)."""
        if self._pending is not None:
            set_random_state(self._pending)
            self._pending = None

    def before_train(self, runner) -> None:
        """Restore right after the resume-time skip of an iteration loop.

        Args:
            runner (mmengine.runner.Runner): the runner.
        """
        loop = runner.train_loop
        if self._pending is not None and hasattr(loop, 'dataloader_iterator'):
            loop.dataloader_iterator = _RestoreBeforeBatch(
                loop.dataloader_iterator, loop.iter, self._restore)

    def before_train_epoch(self, runner) -> None:
        """Restore before an epoch loop makes its first data iterator.

        Args:
            runner (mmengine.runner.Runner): the runner.
        """
        if not hasattr(runner.train_loop, 'dataloader_iterator'):
            self._restore()

    def before_val(self) -> None:
        """Keep the training's random state while validation runs."""
        self._outside_val = get_random_state()

    def after_val(self) -> None:
        """Give the training its random state back."""
        if self._outside_val is not None:
            set_random_state(self._outside_val)
            self._outside_val = None
