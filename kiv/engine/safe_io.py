"""Opt-in safe checkpoint I/O for the whole process: one explicit call.

Importing :mod:`kiv` only registers kiv's modules; it does not change how
mmengine (and every toolbox on top of it) reads and writes files.
:func:`enable_safe_io` switches on, for the current process:

- **weights-only loading** of every checkpoint mmengine opens from a plain
  path (``load_from``, ``--resume``, ``init_cfg=dict(type='Pretrained')``)
  through :func:`kiv.utils.checkpoint.safe_torch_load`, and of every URL
  checkpoint (``http(s)://``, ``torchvision://``, ``open-mmlab://`` ...)
  through :func:`kiv.utils.checkpoint.load_url` (mmengine 0.10 otherwise
  unpickles downloads without the weights-only restriction);
- **atomic local writes** for everything mmengine saves through its file
  backend (checkpoints, ``last_checkpoint``, dumped results):
  :class:`AtomicLocalBackend`. mmengine's ``LocalBackend.put`` /
  ``put_text`` open the target and write into it, so a run killed mid-write
  (pre-emption, out of disk) would leave a truncated ``iter_N.pth`` that the
  next ``--resume`` picks up; this backend writes through
  :func:`kiv.utils.atomic.atomic_write_bytes` (temporary file, fsync,
  rename), like every other file kiv writes.

kiv's tools (``tools/train.py``, ``tools/test.py``) call it first thing. In
your own script::

    import kiv
    kiv.enable_safe_io()

or, without touching the script (e.g. an upstream ``tools/train.py``), in the
config::

    custom_imports = dict(imports=['kiv', 'kiv.engine.use_safe_io'],
                          allow_failed_imports=False)

:func:`disable_safe_io` restores exactly what was there before.

kiv's own loaders (teacher weights, the frozen base ViT, exported students,
``tools/export_student.py``) call ``safe_torch_load`` directly and write
atomically whether or not this is enabled.

How it is switched, through mmengine's public registration API where one
exists: the plain-path loader with
``CheckpointLoader.register_scheme('', loader, force=True)`` and the file
backend with ``mmengine.fileio.register_backend('local', ...,
prefixes='', force=True)``. Three things have no public API in mmengine
0.10 and are done directly: reading what is registered (to put it back),
replacing ``mmengine.runner.checkpoint.load_url`` (the URL, torchvision and
open-mmlab loaders call this module function, so registering schemes would
not reach them) and forgetting the cached backend instances of
``mmengine.fileio.io.backend_instances``.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Optional, Union

from mmengine.fileio import io as mm_io
from mmengine.fileio import register_backend
from mmengine.fileio.backends import LocalBackend, registry_utils
from mmengine.logging import print_log
from mmengine.runner import checkpoint as mm_checkpoint

from kiv.utils.atomic import atomic_write_bytes
from kiv.utils.checkpoint import load_from_local, load_url

__all__ = [
    'enable_safe_io', 'disable_safe_io', 'safe_io_enabled',
    'AtomicLocalBackend'
]


class AtomicLocalBackend(LocalBackend):
    """mmengine's ``LocalBackend`` whose writes are atomic."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        """Write bytes to ``filepath`` atomically."""
        atomic_write_bytes(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, Path],
                 encoding: str = 'utf-8') -> None:
        """Write text to ``filepath`` atomically."""
        atomic_write_bytes(obj.encode(encoding), filepath)


_lock = threading.Lock()
#: what enable_safe_io replaced, to be put back by disable_safe_io
_saved: Optional[dict[str, Any]] = None


def _drop_cached_local_backends() -> None:
    """Forget mmengine's singleton backends for plain paths.

    ``mmengine.fileio.get_file_backend(..., enable_singleton=True)`` (used by
    ``fileio.put``/``dump``/...) caches one instance per prefix and
    arguments; an instance created before a switch would keep the old class.
    """
    for key in [k for k in mm_io.backend_instances if k.startswith(':')]:
        del mm_io.backend_instances[key]


def _install(loader: Callable, url_loader: Callable, prefix_backend: type,
             local_backend: type) -> None:
    """Register loaders and backends with mmengine (public API).

    Args:
        loader: checkpoint loader for plain paths (scheme ``''``).
        url_loader: ``mmengine.runner.checkpoint.load_url``.
        prefix_backend: file backend class for plain paths (prefix ``''``).
        local_backend: file backend class named ``'local'``.
    """
    mm_checkpoint.CheckpointLoader.register_scheme('', loader, force=True)
    mm_checkpoint.load_url = url_loader
    # the prefix first: register_backend also names the class 'local'
    register_backend('local', prefix_backend, force=True, prefixes='')
    register_backend('local', local_backend, force=True)
    _drop_cached_local_backends()


def enable_safe_io() -> bool:
    """Switch on weights-only checkpoint loading and atomic local writes.

    Idempotent and thread-safe; the first call logs one line (through
    mmengine's current logger).

    Returns:
        bool: True if this call switched it on, False if it already was.
    """
    global _saved
    with _lock:
        if _saved is not None:
            return False
        # what is registered now (mmengine has no public getter; it
        # registers load_from_local and LocalBackend itself on import)
        _saved = dict(
            loader=mm_checkpoint.CheckpointLoader._schemes.get(
                '', mm_checkpoint.load_from_local),
            url_loader=mm_checkpoint.load_url,
            prefix_backend=registry_utils.prefix_to_backends.get(
                '', LocalBackend),
            local_backend=registry_utils.backends.get('local', LocalBackend))
        _install(load_from_local, load_url, AtomicLocalBackend,
                 AtomicLocalBackend)
    print_log(
        'kiv safe I/O enabled: mmengine loads checkpoints (paths and URLs) '
        'with torch.load(weights_only=True) and writes local files '
        'atomically (kiv.enable_safe_io)',
        logger='current')
    return True


def disable_safe_io() -> bool:
    """Undo :func:`enable_safe_io`: mmengine's previous loaders and backend.

    Returns:
        bool: True if safe I/O was on and is now off, False if it was off.
    """
    global _saved
    with _lock:
        if _saved is None:
            return False
        saved, _saved = _saved, None
        _install(**saved)
    return True


def safe_io_enabled() -> bool:
    """bool: whether :func:`enable_safe_io` is in effect."""
    return _saved is not None
