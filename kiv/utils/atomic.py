"""Atomic local file writes: a reader sees the old file or the whole new one.

Every file kiv writes (checkpoints through mmengine once
:func:`kiv.engine.enable_safe_io` is on, exported students, the teacher
cache, the demo's stage records, test fixtures) goes through
:func:`atomic_path`:

1. a unique temporary file ``.<name>.<random>.part`` is created in the
   target's directory (same file system, so the rename below is atomic; the
   leading dot and ``.part`` suffix let a writer clean up after a killed run);
2. the caller writes it (by name, or through :func:`atomic_open`);
3. it is flushed to disk (``fsync``), given the permissions a plain
   ``open(path, 'w')`` would give (``0o666 & ~umask``: ``mkstemp`` creates
   owner-only files a team could not read) and renamed over the target with
   ``os.replace``;
4. the directory is synced, so the rename itself survives a power loss.

If anything fails before the rename, the temporary file is removed and the
target is untouched.
"""
from __future__ import annotations

import json
import os
import os.path as osp
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Union

__all__ = [
    'atomic_path', 'atomic_open', 'atomic_write_bytes', 'atomic_write_json',
    'atomic_torch_save', 'file_mode'
]

PathLike = Union[str, Path]

_umask_lock = threading.Lock()


def file_mode() -> int:
    """Permissions a plain ``open(path, 'w')`` would give: 0o666 & ~umask.

    The umask is read from ``/proc/self/status`` where it can be (Linux >=
    4.7) without changing it; elsewhere it is set and restored under a lock,
    so two threads never see each other's temporary umask.
    """
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse it
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """A temporary path to write; renamed over ``path`` on success.

    For writers that want a file name (``safetensors.torch.save_file``,
    ``torch.save``, a copy). The target's directory is created.

    Example::

        with atomic_path(out) as tmp:
            save_file(tensors, tmp)

    Args:
        path (str | Path): the final file.

    Yields:
        str: the temporary file (exists, empty) to write.
    """
    path = str(path)
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory,
                               prefix=f'.{osp.basename(path)}.',
                               suffix='.part')
    os.close(fd)
    try:
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


@contextmanager
def atomic_open(path: PathLike, mode: str = 'wb',
                encoding: str | None = None) -> Iterator[IO]:
    """``open(path, mode)`` for writing, committed atomically on exit.

    Args:
        path (str | Path): the final file.
        mode (str): ``'wb'`` or ``'w'``. Defaults to ``'wb'``.
        encoding (str, optional): text encoding (``'w'`` mode).

    Yields:
        file: the open temporary file.
    """
    if not mode.startswith('w'):
        raise ValueError(f'atomic_open writes a new file: mode {mode!r}')
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f


def atomic_write_bytes(data: bytes, path: PathLike) -> None:
    """Write ``data`` to ``path`` atomically (see the module doc)."""
    with atomic_open(path, 'wb') as f:
        f.write(data)


def atomic_write_json(obj: Any, path: PathLike, **dump_kwargs: Any) -> None:
    """Write ``obj`` as UTF-8 json to ``path`` atomically.

    Args:
        obj: json-able data.
        path (str | Path): the final file.
        **dump_kwargs: :func:`json.dump` options (``indent``, ``sort_keys``,
            ``default``).
    """
    with atomic_open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, **dump_kwargs)


def atomic_torch_save(obj: Any, path: PathLike, **save_kwargs: Any) -> None:
    """``torch.save(obj, path, **save_kwargs)`` atomically."""
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp, **save_kwargs)
