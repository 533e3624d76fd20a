"""Safe checkpoint loading for torch >= 2.6 and mmengine 0.10.x.

Design
------
Every checkpoint kiv or mmengine opens from a local path goes through
:func:`safe_torch_load`, which calls ``torch.load(..., weights_only=True)``
explicitly (not relying on torch's default, which the environment variable
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` could flip). ``weights_only`` unpickling
only rebuilds tensors, containers, primitive types and the globals on an
allowlist; it never calls arbitrary callables, so a malicious file cannot run
code.

Plain weights (``load_from``, ``init_cfg=dict(type='Pretrained')``, teacher
checkpoints, exported students) are state dicts and need nothing more. The
checkpoints mmengine's ``Runner`` writes for ``--resume`` also contain the
``MessageHub`` state, whose ``HistoryBuffer`` objects pickle their statistics
methods through ``builtins.getattr``; allowlisting ``getattr`` would let a
crafted file reach attributes of any allowlisted object, so we do not.
Instead we *sanitise what we save*: :class:`~kiv.engine.checkpoint_hook.
SafeCheckpointHook` (added to every run by ``tools/train.py``) stores the
message hub as plain tensors and numbers and rebuilds it on load. The only
globals we allowlist (:data:`SAFE_GLOBALS`) are NumPy's array, scalar and
dtype reconstructors, which rebuild values from raw bytes and run no code:
metadata written by other hooks or toolboxes may contain NumPy values.

A file that needs anything else is refused with
:class:`UnsafeCheckpointError`, naming the file and the offending global.
"""
from __future__ import annotations

import os.path as osp
import pickle
from typing import Any, Callable

import numpy as np
import torch
from mmengine.runner.checkpoint import CheckpointLoader


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs globals outside the allowlist, so it was refused."""


def _numpy_globals() -> list[Any]:
    """NumPy types that pickled arrays/scalars reference (NumPy 1 and 2)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1
        from numpy.core import multiarray
    items: list[Any] = [np.ndarray, np.dtype]
    # Pickles name the reconstructor by the module path of the NumPy that
    # wrote them: ``numpy.core.multiarray`` (NumPy 1) or
    # ``numpy._core.multiarray`` (NumPy 2). Allow both spellings.
    for mod_name in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        items.append((multiarray._reconstruct,
                      f'{mod_name}._reconstruct'))
        items.append((multiarray.scalar, f'{mod_name}.scalar'))
    # dtype classes (``numpy.dtypes.Float64DType`` ...), NumPy >= 1.25.
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        items.extend(
            getattr(dtypes, name) for name in dir(dtypes)
            if name.endswith('DType') and isinstance(getattr(dtypes, name),
                                                     type))
    return items


#: Data-only globals allowed in checkpoints besides torch's own: NumPy
#: arrays, scalars and dtypes (metadata of runs and toolboxes).
SAFE_GLOBALS: list[Any] = _numpy_globals()


def register_safe_globals() -> None:
    """Add :data:`SAFE_GLOBALS` to torch's weights-only allowlist.

    Idempotent; called once when :mod:`kiv` is imported.
    """
    torch.serialization.add_safe_globals(SAFE_GLOBALS)


def safe_torch_load(filename: str,
                    map_location: str | Callable | None = None) -> Any:
    """``torch.load`` with ``weights_only=True`` and a clear refusal.

    Args:
        filename (str): path of a local checkpoint file.
        map_location: as in :func:`torch.load`.

    Returns:
        Any: the unpickled object (usually a dict of tensors / metadata).

    Raises:
        FileNotFoundError: if ``filename`` does not exist.
        UnsafeCheckpointError: if the file needs a global that is not on the
            allowlist (a pickle that could run code, or a foreign object).
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint file not found: {filename}')
    try:
        return torch.load(filename, map_location=map_location,
                          weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((ln for ln in first if 'Unsupported' in ln
                       or 'global' in ln.lower()), first[0] if first else '')
        raise UnsafeCheckpointError(
            f'refused to load checkpoint {filename}: it needs a global that '
            f'is not on kiv\'s weights-only allowlist ({detail.strip()}). '
            'Only load checkpoints you trust; convert foreign files to a '
            'plain state dict first.') from None


@CheckpointLoader.register_scheme(prefixes='', force=True)
def load_from_local(filename: str,
                    map_location: str | Callable | None = None) -> Any:
    """mmengine's local-path checkpoint loader, replaced by the safe one.

    Registered for the empty prefix (plain paths), so ``load_from``,
    ``--resume`` and ``init_cfg=dict(type='Pretrained')`` in every toolbox use
    :func:`safe_torch_load`.
    """
    return safe_torch_load(filename, map_location)


register_safe_globals()
