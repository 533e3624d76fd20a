"""Make the checkpoints a Runner writes loadable with ``weights_only=True``.

mmengine 0.10.x stores the ``MessageHub`` state in every checkpoint as
:class:`~mmengine.logging.HistoryBuffer` objects whose ``__getstate__`` also
pickles the buffer's statistics *methods* (as ``getattr(HistoryBuffer,
'min')``). Loading that with ``weights_only=True`` would need
``builtins.getattr`` on the allowlist, which would let a crafted file reach
attributes of any allowlisted object. Instead, :class:`SafeCheckpointHook`
rewrites the message hub into plain data (tensors, numbers, strings) before
the checkpoint is written and rebuilds the ``HistoryBuffer`` objects right
after it is loaded (``after_load_checkpoint`` runs before the Runner restores
the message hub on ``--resume``).

``tools/train.py`` adds this hook to every run, whatever the toolbox.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer

from kiv.registry import HOOKS
from ..random_state import ResumeRandomState

#: Marker key of a serialised HistoryBuffer.
_BUFFER_TAG = '__kiv_history_buffer__'


def to_weights_only_data(obj: Any) -> Any:
    """Recursively turn NumPy values and HistoryBuffers into plain data.

    Args:
        obj: any nested structure of dicts, lists, tuples, NumPy values,
            tensors and HistoryBuffers.

    Returns:
        The same structure with ``np.generic`` -> Python scalar,
        ``np.ndarray`` -> ``torch.Tensor`` and ``HistoryBuffer`` -> a tagged
        dict of tensors.
    """
    if isinstance(obj, HistoryBuffer):
        return {
            _BUFFER_TAG: True,
            'log_history': torch.from_numpy(np.asarray(obj._log_history)),
            'count_history': torch.from_numpy(np.asarray(obj._count_history)),
            'max_length': int(obj.max_length),
        }
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return type(obj)((k, to_weights_only_data(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_weights_only_data(v) for v in obj)
    return obj


def restore_history_buffers(obj: Any) -> Any:
    """Inverse of :func:`to_weights_only_data` for HistoryBuffers (the rest
    stays plain data)."""
    if isinstance(obj, dict):
        if obj.get(_BUFFER_TAG):
            buf = HistoryBuffer(max_length=obj['max_length'])
            buf._log_history = obj['log_history'].numpy()
            buf._count_history = obj['count_history'].numpy()
            return buf
        return type(obj)(
            (k, restore_history_buffers(v)) for k, v in obj.items())
    return obj


@HOOKS.register_module()
class SafeCheckpointHook(Hook):
    """Save the message hub as plain data; rebuild it on load.

    With this hook a Runner's own checkpoints (including ``--resume``) load
    with ``torch.load(weights_only=True)``. Its priority is ``VERY_LOW`` so
    on save it runs after every other hook has added its data, and on load
    it runs after the other hooks, still before the Runner restores the
    message hub. It rewrites only ``message_hub`` and ``meta``, and adds
    ``random_state``: the global random states (Python, NumPy, torch), put
    back on ``--resume`` right before the first batch after the checkpoint
    (:class:`kiv.engine.random_state.ResumeRandomState`), so a resumed run
    continues bit for bit as the uninterrupted one.
    """

    priority = 'VERY_LOW'

    def __init__(self) -> None:
        self.random_state = ResumeRandomState()

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        for key in ('message_hub', 'meta'):
            if key in checkpoint:
                checkpoint[key] = to_weights_only_data(checkpoint[key])
        self.random_state.save(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if 'message_hub' in checkpoint:
            checkpoint['message_hub'] = restore_history_buffers(
                checkpoint['message_hub'])
        self.random_state.load(runner, checkpoint)

    def before_train(self, runner) -> None:
        self.random_state.before_train(runner)

    def before_train_epoch(self, runner) -> None:
        self.random_state.before_train_epoch(runner)

    def before_val(self, runner) -> None:
        self.random_state.before_val()

    def after_val(self, runner) -> None:
        self.random_state.after_val()
