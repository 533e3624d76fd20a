"""Atomic local file writes for everything mmengine saves.

mmengine writes checkpoints, ``last_checkpoint`` and dumped results through
its ``LocalBackend.put`` / ``put_text``, which open the target file and
write into it: a run killed mid-write (pre-emption, out of disk) leaves a
truncated ``iter_N.pth`` that the next ``--resume`` picks up.
:class:`AtomicLocalBackend` writes to a temporary file next to the target,
flushes it to disk and renames it over the target (``os.replace`` is atomic
on POSIX), so a reader sees either the old file or the complete new one.
It is registered for plain paths by :func:`kiv.engine.enable_safe_io` (kiv's
tools call it); importing :mod:`kiv` alone leaves mmengine's backend alone.
"""
from __future__ import annotations

import os
import os.path as osp
import tempfile
import threading
from pathlib import Path
from typing import Union

from mmengine.fileio.backends import LocalBackend
from mmengine.utils import mkdir_or_exist

__all__ = ['AtomicLocalBackend', 'atomic_write_bytes']

_umask_lock = threading.Lock()


def _file_mode() -> int:
    """Permissions a plain ``open(path, 'w')`` would give: 0o666 & ~umask.

    ``tempfile.mkstemp`` creates files readable by the owner only; a
    checkpoint renamed from it would be unreadable to the rest of a team.
    """
    try:  # Linux >= 4.7: read the umask without changing it
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


def atomic_write_bytes(data: bytes, filepath: Union[str, Path]) -> None:
    """Write ``data`` to ``filepath`` atomically (temp file + rename).

    Args:
        data (bytes): file content.
        filepath (str | Path): target path; its directory is created.
    """
    filepath = str(filepath)
    directory = osp.dirname(osp.abspath(filepath))
    mkdir_or_exist(directory)
    fd, tmp = tempfile.mkstemp(dir=directory,
                               prefix=f'.{osp.basename(filepath)}.',
                               suffix='.part')
    try:
        with os.fdopen(fd, 'wb') as f:
            os.fchmod(f.fileno(), _file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


class AtomicLocalBackend(LocalBackend):
    """mmengine's ``LocalBackend`` whose writes are atomic."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        """Write bytes to ``filepath`` atomically."""
        atomic_write_bytes(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, Path],
                 encoding: str = 'utf-8') -> None:
        """Write text to ``filepath`` atomically."""
        atomic_write_bytes(obj.encode(encoding), filepath)
