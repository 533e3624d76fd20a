"""On-disk format of the teacher-feature cache (no pickle anywhere).

A cache directory holds::

    index.json                  what was cached and how (see below)
    images.txt                  the image list, one path per line (UTF-8),
                                relative to ``index['images']['root']``
    shard-00000.safetensors     targets of a contiguous range of images
    ...
    statistics.safetensors      exact standardiser sums of all the targets
                                (written last: the cache is complete)

Every file is written with :func:`kiv.utils.atomic.atomic_path` (a
temporary file in the same directory, flushed to disk and renamed over its
final name), so a reader (or a resumed writer) sees either no file or the
complete one.

Shard tensors (``N`` = cached views in the shard, ``K`` per readable image,
rows ordered by image then view):

* ``target.<teacher>.summary`` ``(N, C)`` and
  ``target.<teacher>.features.<l>`` ``(N, C_l, h_l, w_l)`` in the storage
  dtype (fp16, bf16 or fp32): the raw (not standardised) teacher outputs;
* ``view.image`` ``(N,)`` int64 global image index, ``view.view`` ``(N,)``
  int64 view number, ``view.box`` ``(N, 4)`` int64 crop box ``(x, y, w, h)``
  in the decoded image, ``view.flip`` ``(N,)`` uint8, ``view.image_hw``
  ``(N, 2)`` int64 decoded image size;
* ``check.<key>`` float64 ``(3 + C,)``: ``[rows, sum err^2, sum x^2,
  sum x]`` of the stored values and of their storage rounding error ``err``
  (reported as ``index['rounding_error']``);
* header metadata: ``format``, ``version``, ``cache_id``, ``shard``,
  ``first_image``, ``num_images``, ``skipped`` (json list of unreadable
  image indices).

While the cache is being written, each shard also has a side file
``shard-<i>.stats.safetensors`` (written just before the shard) with its
packed standardiser sums ``stats.<key>`` (float64 ``[count, sum x,
sum x x^T]`` per key of :meth:`kiv.SharedLatentSpace.statistic_keys`): the
exact statistics of the whole cache are their sum, whichever run or rank
wrote each shard. They are summed into ``statistics.safetensors`` and
deleted when the cache is complete.

Target and statistic keys are those of the shared latent space:
``'<teacher>.summary'`` and ``'<teacher>.features.<level>'``.

In memory, ``kiv.TeacherCacheDataset`` hands a view's targets to
``kiv.CachedTeacher`` in its data sample: the field :data:`CACHED_TARGETS`
(``{key: Tensor}``) and the metainfo key :data:`CACHE_ID` (the cache id).

This module is below both of them (``kiv.datasets`` writes and reads the
files, ``kiv.models`` reads the index and the statistics): it imports
neither.
"""
from __future__ import annotations

import hashlib
import json
import os.path as osp
from collections.abc import Mapping, Sequence
from typing import Any, Iterator

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor

from kiv.utils.atomic import atomic_path, atomic_write_bytes

__all__ = [
    'CACHE_FORMAT', 'CACHE_VERSION', 'INDEX_FILE', 'IMAGES_FILE',
    'STATISTICS_FILE', 'STORAGE_DTYPES', 'CACHED_TARGETS', 'CACHE_ID',
    'TeacherCacheError', 'ImageList', 'shard_name', 'shard_stats_name',
    'output_keys', 'fingerprint', 'config_to_json', 'read_index',
    'write_json_atomic', 'write_safetensors_atomic', 'read_image_list',
    'write_image_list', 'save_statistics', 'load_statistics',
    'cache_statistics', 'open_shard', 'shard_metadata'
]

CACHE_FORMAT = 'kiv-teacher-cache'
CACHE_VERSION = 1
INDEX_FILE = 'index.json'
IMAGES_FILE = 'images.txt'
STATISTICS_FILE = 'statistics.safetensors'

#: data-sample field holding ``{'<teacher>.summary' | '<teacher>.features.l':
#: Tensor}`` (one sample, storage dtype) for ``kiv.CachedTeacher``.
CACHED_TARGETS = 'cached_targets'
#: data-sample metainfo key: the ``cache_id`` the targets come from.
CACHE_ID = 'teacher_cache'

#: ``--dtype`` option -> storage dtype of the targets.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    'fp16': torch.float16,
    'bf16': torch.bfloat16,
    'fp32': torch.float32,
}


class TeacherCacheError(ValueError):
    """A teacher-feature cache is missing, incomplete, corrupt or does not
    match the config that wants to use (or extend) it."""


def shard_name(index: int) -> str:
    """File name of shard ``index``, e.g. ``'shard-00003.safetensors'``."""
    return f'shard-{index:05d}.safetensors'


def shard_stats_name(index: int) -> str:
    """File name of the statistic sums of shard ``index`` (kept until the
    cache is complete), e.g. ``'shard-00003.stats.safetensors'``."""
    return f'shard-{index:05d}.stats.safetensors'


def output_keys(teacher: str, has_summary: bool,
                num_levels: int) -> list[str]:
    """Keys of one teacher's outputs, summary first.

    Args:
        teacher (str): teacher name.
        has_summary (bool): whether the teacher has a summary.
        num_levels (int): number of dense levels.

    Returns:
        list[str]: ``['<t>.summary', '<t>.features.0', ...]``.
    """
    keys = [f'{teacher}.summary'] if has_summary else []
    return keys + [f'{teacher}.features.{i}' for i in range(num_levels)]


def config_to_json(obj: Any) -> Any:
    """A json-able copy of a config value (ConfigDict -> dict, tuple ->
    list; other objects by ``repr``)."""
    if isinstance(obj, Mapping):
        return {str(k): config_to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [config_to_json(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def fingerprint(obj: Any) -> str:
    """sha256 (hex, first 16 characters) of the canonical json of ``obj``.

    Args:
        obj: a config value (see :func:`config_to_json`).

    Returns:
        str: 16 hex digits, equal for equal configs.
    """
    text = json.dumps(config_to_json(obj), sort_keys=True,
                      separators=(',', ':'))
    return hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]


def write_json_atomic(obj: Any, path: str) -> None:
    """Write ``obj`` as indented json to ``path`` atomically."""
    text = json.dumps(obj, indent=1, sort_keys=False) + '\n'
    atomic_write_bytes(text.encode('utf-8'), path)


def write_safetensors_atomic(tensors: Mapping[str, Tensor], path: str,
                             metadata: Mapping[str, str]) -> int:
    """Save tensors as a safetensors file atomically.

    Args:
        tensors (dict[str, Tensor]): CPU tensors (made contiguous here).
        path (str): final file path.
        metadata (dict[str, str]): header metadata.

    Returns:
        int: the file size in bytes.
    """
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            tmp, metadata=dict(metadata))
        size = osp.getsize(tmp)
    return size


def open_shard(path: str):
    """Open a safetensors file for lazy (memory-mapped) reads.

    Args:
        path (str): a shard or statistics file.

    Returns:
        safetensors ``safe_open`` handle (framework ``'pt'``, CPU).

    Raises:
        TeacherCacheError: the file is missing or not a safetensors file.
    """
    if not osp.isfile(path):
        raise TeacherCacheError(f'teacher cache file not found: {path}')
    try:
        return safetensors.safe_open(path, framework='pt', device='cpu')
    except Exception as err:  # safetensors raises its own error types
        raise TeacherCacheError(
            f'teacher cache file {path} is not a readable safetensors file '
            f'({type(err).__name__}: {err})') from err


def shard_metadata(handle, path: str, cache_id: str) -> dict[str, str]:
    """Header metadata of an open shard, checked against ``cache_id``.

    Raises:
        TeacherCacheError: the shard belongs to another cache.
    """
    meta = handle.metadata() or {}
    if meta.get('format') != CACHE_FORMAT:
        raise TeacherCacheError(f'{path} is not a kiv teacher-cache shard '
                                f'(metadata format={meta.get("format")!r})')
    if meta.get('cache_id') != cache_id:
        raise TeacherCacheError(
            f'{path} belongs to cache {meta.get("cache_id")!r}, not to '
            f'{cache_id!r} of its index.json (files of two caches mixed in '
            'one directory)')
    return meta


def read_index(cache_dir: str, require_complete: bool = True) -> dict:
    """Read and check ``index.json`` of a cache directory.

    Args:
        cache_dir (str): the cache directory.
        require_complete (bool): refuse a cache whose writing has not
            finished. Defaults to True.

    Returns:
        dict: the index (see ``docs/teacher_cache.md``).

    Raises:
        TeacherCacheError: missing, unreadable, foreign or incomplete index.
    """
    path = osp.join(cache_dir, INDEX_FILE)
    if not osp.isfile(path):
        raise TeacherCacheError(
            f'no teacher cache at {cache_dir}: {path} does not exist; write '
            'it with: python tools/cache_teachers.py CONFIG --out '
            f'{cache_dir}')
    try:
        with open(path, encoding='utf-8') as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise TeacherCacheError(f'cannot read {path}: {err}') from err
    if not isinstance(index, dict) or index.get('format') != CACHE_FORMAT:
        raise TeacherCacheError(f'{path} is not a kiv teacher-cache index')
    if index.get('version') != CACHE_VERSION:
        raise TeacherCacheError(
            f'{path} has cache format version {index.get("version")}; this '
            f'kiv reads version {CACHE_VERSION}: rewrite the cache')
    if require_complete and not index.get('complete'):
        raise TeacherCacheError(
            f'teacher cache {cache_dir} is incomplete (its writing was '
            'interrupted); finish it by running the same command again: '
            f'python tools/cache_teachers.py {index.get("config", "CONFIG")}'
            f' --out {cache_dir}')
    return index


class ImageList(Sequence):
    """A compact, immutable list of image paths.

    The paths are kept as one UTF-8 byte buffer plus offsets (two NumPy
    arrays), so a million-image list costs tens of MB once, and is shared
    copy-on-write by forked dataloader workers (no per-string objects whose
    reference counts would copy the pages).

    Args:
        paths (Sequence[str]): the paths.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [p.encode('utf-8') for p in paths]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64,
                              count=len(encoded))
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._data = np.frombuffer(b''.join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f'image index {index} out of range for '
                             f'{len(self)} images')
        index %= len(self)
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._data[start:end].tobytes().decode('utf-8')

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def sha256(self) -> str:
        """sha256 (hex) of the newline-joined list, as in ``images.txt``."""
        digest = hashlib.sha256()
        for i, path in enumerate(self):
            digest.update((('\n' if i else '') + path).encode('utf-8'))
        return digest.hexdigest()


def write_image_list(paths: Sequence[str], path: str) -> None:
    """Write ``images.txt`` (one path per line) atomically.

    Raises:
        TeacherCacheError: a path contains a line break.
    """
    bad = [p for p in paths if '\n' in p or '\r' in p]
    if bad:
        raise TeacherCacheError(f'image paths with line breaks cannot be '
                                f'cached: {bad[:3]!r}')
    atomic_write_bytes('\n'.join(paths).encode('utf-8'), path)


def read_image_list(path: str, count: int | None = None) -> ImageList:
    """Read ``images.txt``.

    Args:
        path (str): the file.
        count (int, optional): expected number of images.

    Returns:
        ImageList: the paths.

    Raises:
        TeacherCacheError: missing file or a different count.
    """
    if not osp.isfile(path):
        raise TeacherCacheError(f'teacher cache image list not found: {path}')
    with open(path, encoding='utf-8') as f:
        text = f.read()
    paths = text.split('\n') if text else []
    if count is not None and len(paths) != count:
        raise TeacherCacheError(f'{path} lists {len(paths)} images, its '
                                f'index.json says {count}')
    return ImageList(paths)


def save_statistics(sums: Mapping[str, Tensor], path: str,
                    metadata: Mapping[str, str]) -> None:
    """Write the summed standardiser statistics atomically.

    Args:
        sums (dict[str, Tensor]): float64 packed sums per statistic key.
        path (str): ``statistics.safetensors``.
        metadata (dict[str, str]): header metadata (``cache_id``,
            ``standardize``, ``num_samples``).
    """
    meta = dict(format=CACHE_FORMAT, version=str(CACHE_VERSION),
                kind='statistics')
    meta.update(metadata)
    write_safetensors_atomic({k: v.double() for k, v in sums.items()}, path,
                             meta)


def load_statistics(path: str,
                    cache_id: str | None = None) -> dict[str, Tensor]:
    """Read a cache's exact standardiser statistics.

    The result is what :meth:`kiv.KnowledgeInheritance.load_statistics`
    (and ``kiv.SharedLatentSpace.load_statistics``) take.

    Args:
        path (str): ``<cache>/statistics.safetensors``.
        cache_id (str, optional): refuse a file of another cache.

    Returns:
        dict[str, Tensor]: float64 packed sums ``[count, sum x,
        sum x x^T (or x^2)]`` per key ``'<teacher>.summary'`` /
        ``'<teacher>.features.<level>'``.

    Raises:
        TeacherCacheError: missing, foreign or mismatched file.
    """
    handle = open_shard(path)
    meta = handle.metadata() or {}
    if meta.get('format') != CACHE_FORMAT or \
            meta.get('kind') != 'statistics':
        raise TeacherCacheError(f'{path} is not a kiv teacher-cache '
                                'statistics file')
    if cache_id is not None and meta.get('cache_id') != cache_id:
        raise TeacherCacheError(
            f'{path} holds the statistics of cache '
            f'{meta.get("cache_id")!r}, not of {cache_id!r}')
    return {key: handle.get_tensor(key) for key in handle.keys()}


def cache_statistics(cache_dir: str) -> tuple[dict[str, Tensor], dict]:
    """The exact standardiser sums of all the targets of a complete cache.

    Args:
        cache_dir (str): the cache directory.

    Returns:
        tuple[dict[str, Tensor], dict]: the packed float64 sums (see
        :func:`load_statistics`) and the index.

    Raises:
        TeacherCacheError: no complete cache, or a foreign statistics file.
    """
    index = read_index(cache_dir)
    return load_statistics(osp.join(cache_dir, STATISTICS_FILE),
                           index['cache_id']), index
