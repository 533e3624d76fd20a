"""Safe checkpoint loading for torch >= 2.6 and mmengine 0.10.x.

Design
------
:func:`safe_torch_load` calls ``torch.load(..., weights_only=True)``
explicitly (not relying on torch's default, which the environment variable
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` could flip). ``weights_only``
unpickling only rebuilds tensors, containers, primitive types and the
globals on an allowlist; it never calls arbitrary callables, so a malicious
file cannot run code. kiv's own loaders (teacher weights, the frozen base
ViT, exported students, the export tool) always call it directly.

Plain weights (``load_from``, ``init_cfg=dict(type='Pretrained')``, teacher
checkpoints, exported students) are state dicts and need nothing more. The
checkpoints mmengine's ``Runner`` writes for ``--resume`` also contain the
``MessageHub`` state, whose ``HistoryBuffer`` objects pickle their statistics
methods through ``builtins.getattr``; allowlisting ``getattr`` would let a
crafted file reach attributes of any allowlisted object, so we do not.
Instead we *sanitise what we save*: :class:`~kiv.engine.hooks.
SafeCheckpointHook` (added to every run by ``tools/train.py``) stores the
message hub as plain tensors and numbers and rebuilds it on load. The only
extra globals we allow (:data:`SAFE_GLOBALS`) are NumPy's array, scalar and
dtype reconstructors, which rebuild values from raw bytes and run no code:
metadata written by other hooks or toolboxes may contain NumPy values. They
are allowed only for the duration of a kiv load (:func:`allow_safe_globals`),
never added to torch's process-wide allowlist.

A file that needs anything else is refused with
:class:`UnsafeCheckpointError`, naming the file and the offending global.

Importing kiv does not change how mmengine loads checkpoints. The loaders
here (:func:`load_from_local`, :func:`load_url`) replace mmengine's for
plain paths and URLs only once :func:`kiv.engine.enable_safe_io` is called
(kiv's tools do; see :mod:`kiv.engine.safe_io`).
"""
from __future__ import annotations

import os.path as osp
import pickle
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch


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


_allow_lock = threading.Lock()
_allow_depth = 0
_allow_added: list[Any] = []


@contextmanager
def allow_safe_globals() -> Iterator[None]:
    """Allow :data:`SAFE_GLOBALS` in ``weights_only`` loads, temporarily.

    Unlike :class:`torch.serialization.safe_globals`, leaving the context
    removes only the entries this context added: globals the user put on
    torch's allowlist before stay there. Re-entrant and thread-safe (the
    entries stay while any thread is inside).

    Yields:
        None
    """
    global _allow_depth, _allow_added
    with _allow_lock:
        if _allow_depth == 0:
            present = set(torch.serialization.get_safe_globals())
            _allow_added = [g for g in SAFE_GLOBALS if g not in present]
            torch.serialization.add_safe_globals(_allow_added)
        _allow_depth += 1
    try:
        yield
    finally:
        with _allow_lock:
            _allow_depth -= 1
            if _allow_depth == 0 and _allow_added:
                keep = [
                    g for g in torch.serialization.get_safe_globals()
                    if g not in set(_allow_added)
                ]
                torch.serialization.clear_safe_globals()
                torch.serialization.add_safe_globals(keep)
                _allow_added = []


def _refusal(filename: str, err: pickle.UnpicklingError
             ) -> UnsafeCheckpointError:
    """The :class:`UnsafeCheckpointError` for a weights-only failure."""
    first = str(err).strip().splitlines()
    detail = next((ln for ln in first
                   if 'Unsupported' in ln or 'global' in ln.lower()),
                  first[0] if first else '')
    return UnsafeCheckpointError(
        f'refused to load checkpoint {filename}: it needs a global that '
        f'is not on kiv\'s weights-only allowlist ({detail.strip()}). '
        'Only load checkpoints you trust; convert foreign files to a '
        'plain state dict first.')


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
        with allow_safe_globals():
            return torch.load(filename, map_location=map_location,
                              weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(filename, err) from None


def load_from_local(filename: str,
                    map_location: str | Callable | None = None) -> Any:
    """mmengine's loader for plain paths, made safe.

    Registered for the empty prefix by :func:`kiv.engine.enable_safe_io`,
    so ``load_from``, ``--resume`` and ``init_cfg=dict(type='Pretrained')``
    in every toolbox go through :func:`safe_torch_load`.

    Args:
        filename (str): local checkpoint path.
        map_location: as in :func:`torch.load`.

    Returns:
        Any: the loaded checkpoint.
    """
    return safe_torch_load(filename, map_location)


def load_url(url: str,
             model_dir: Optional[str] = None,
             map_location: str | Callable | None = None,
             progress: bool = True,
             check_hash: bool = False,
             file_name: Optional[str] = None) -> Any:
    """``torch.hub.load_state_dict_from_url`` with ``weights_only=True``.

    mmengine 0.10's ``load_from_http`` (behind ``http(s)://``,
    ``torchvision://``, ``open-mmlab://``, ``mmcls://`` ... checkpoints)
    calls torch's ``load_url``, whose ``weights_only`` defaults to False:
    any downloaded file could run code. :func:`kiv.engine.enable_safe_io`
    puts this function in its place. Same arguments as torch's.

    Args:
        url (str): the file's URL.
        model_dir (str, optional): download cache folder (torch hub's
            ``checkpoints`` folder by default).
        map_location: as in :func:`torch.load`.
        progress (bool): show a download progress bar.
        check_hash (bool): verify the hash prefix of the file name.
        file_name (str, optional): cache file name (from the URL by default).

    Returns:
        Any: the loaded checkpoint.

    Raises:
        UnsafeCheckpointError: the file needs a global off the allowlist.
    """
    try:
        with allow_safe_globals():
            return torch.hub.load_state_dict_from_url(
                url, model_dir=model_dir, map_location=map_location,
                progress=progress, check_hash=check_hash,
                file_name=file_name, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(url, err) from None
