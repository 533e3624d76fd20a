"""What a teacher cache will hold, decided before anything is written.

The plan is the cache's index without the shard results: the image list,
the teachers' output shapes and config fingerprints, views, seed and storage
dtype, the shard layout (``shard_size`` images per shard file) and the sizes
of the statistic sums (:func:`make_index`). From it come the disk estimate
and report (:func:`estimate`, :func:`report`) and the check that a directory
holds a cache of the same plan, which a run may resume
(:func:`index_differences`).
"""
from __future__ import annotations

import datetime
import math
import os.path as osp
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from mmengine.config import Config, ConfigDict
from mmengine.registry import DefaultScope

from kiv.fileio.teacher_cache_format import (CACHE_FORMAT, CACHE_VERSION,
                                             IMAGES_FILE, INDEX_FILE,
                                             STATISTICS_FILE, ImageList,
                                             TeacherCacheError,
                                             config_to_json, fingerprint,
                                             read_index)
from kiv.fileio.teacher_cache_identity import (config_type,
                                               dataset_fingerprint,
                                               teacher_fingerprint)
from kiv.registry import DATASETS
from kiv.version import __version__

__all__ = [
    'VIEW_ROW_BYTES', 'DEFAULT_SHARD_BYTES', 'format_bytes', 'check_config',
    'image_list', 'bytes_per_view', 'choose_shard_size', 'make_index',
    'shard_images', 'estimate', 'report', 'index_differences',
    'cache_identity', 'mark_reused'
]

#: bytes of the view description of one cached view: image (int64), view
#: (int64), box (4 x int64), flip (uint8), image_hw (2 x int64).
VIEW_ROW_BYTES = 8 + 8 + 4 * 8 + 1 + 2 * 8
#: target size of one shard when ``shard_size`` is not given.
DEFAULT_SHARD_BYTES = 1 << 30


def format_bytes(num: float) -> str:
    """Human-readable size with binary prefixes, e.g. ``'1.50 GiB'``."""
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if abs(num) < 1024 or unit == 'TiB':
            return f'{num:.0f} {unit}' if unit == 'B' else \
                f'{num:.2f} {unit}'
        num /= 1024
    raise AssertionError('unreachable')


def check_config(cfg: Config, config_path: str | None) -> None:
    """Check that ``cfg`` is a distillation config with teachers to cache.

    Raises:
        TeacherCacheError: no ``model.teachers``, teachers that already read
            a cache, or no ``train_dataloader.dataset``.
    """
    model = cfg.get('model')
    if not isinstance(model, Mapping) or not model.get('teachers'):
        raise TeacherCacheError(
            f'{config_path or "the config"}: model.teachers is '
            'missing; tools/cache_teachers.py needs a '
            'kiv.KnowledgeInheritance config')
    cached = [n for n, t in model['teachers'].items()
              if config_type(t).endswith('CachedTeacher')]
    if cached:
        raise TeacherCacheError(
            f'teachers {cached} already read from a cache '
            '(kiv.CachedTeacher); give the config with the real teachers')
    if not cfg.get('train_dataloader', {}).get('dataset'):
        raise TeacherCacheError('the config has no '
                                'train_dataloader.dataset to cache')


def image_list(cfg: Config, scope: str) -> tuple[str, list[str]]:
    """The train dataset's images.

    Args:
        cfg (Config): the distillation config.
        scope (str): registry scope to build the dataset in.

    Returns:
        tuple[str, list[str]]: the image folder (``img_dir`` of
        ``kiv.UnlabeledImageDataset``, ``''`` for other datasets) and
        the image paths relative to it, in dataset order.
    """
    ds_cfg = ConfigDict({**cfg.train_dataloader.dataset, 'pipeline': []})
    with DefaultScope.overwrite_default_scope(scope):
        dataset = DATASETS.build(ds_cfg)
    if hasattr(dataset, 'full_init'):
        dataset.full_init()
    paths = []
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        if 'img_path' not in info:
            raise TeacherCacheError(
                f'train dataset {type(dataset).__name__} sample {i} has '
                "no 'img_path'; the cache needs an image dataset such as "
                'kiv.UnlabeledImageDataset')
        paths.append(info['img_path'])
    root = getattr(dataset, 'img_dir', '') or ''
    prefix = root.rstrip('/') + '/'
    if root and all(p.startswith(prefix) for p in paths):
        return root, [p[len(prefix):] for p in paths]
    return '', paths


def _item_size(storage_dtype: torch.dtype) -> int:
    return torch.empty((), dtype=storage_dtype).element_size()


def bytes_per_view(teachers: Mapping[str, Mapping],
                   storage_dtype: torch.dtype) -> int:
    """Bytes of one cached view: every teacher output and the view row."""
    item = _item_size(storage_dtype)
    total = VIEW_ROW_BYTES
    for entry in teachers.values():
        if entry['summary_dim'] is not None:
            total += entry['summary_dim'] * item
        for dim, (h, w) in zip(entry['feature_dims'], entry['grids']):
            total += dim * h * w * item
    return total


def choose_shard_size(requested: int | None, out_dir: str, per_view: int,
                      num_images: int, views: int) -> int:
    """Images per shard: the requested number, else the existing cache's
    (a resume), else as many as fit in about :data:`DEFAULT_SHARD_BYTES`.
    """
    if requested is not None:
        return requested
    existing = osp.join(out_dir, INDEX_FILE)
    if osp.isfile(existing):
        try:
            return int(read_index(out_dir,
                                  require_complete=False)['shard_size'])
        except (TeacherCacheError, KeyError, TypeError, ValueError):
            pass
    return max(1, min(num_images, DEFAULT_SHARD_BYTES // (per_view * views)))


def make_index(cfg: Config, config_path: str | None, root: str,
               paths: Sequence[str], teachers: dict[str, dict],
               stat_sizes: Mapping[str, int], standardize: str,
               pipeline: tuple[dict, dict, dict], views: int, seed: int,
               dtype: str, shard_size: int, per_view: int) -> dict:
    """The index of a cache before its shards are written.

    Args:
        cfg (Config): the (online) distillation config.
        config_path (str, optional): its file, recorded.
        root (str): the image folder; ``paths`` are relative to it.
        paths (Sequence[str]): the images, in dataset order.
        teachers (dict[str, dict]): per teacher the output shapes of
            :meth:`~kiv.datasets.teacher_cache.teachers.ConfigTeachers.probe`
            (completed here with ``fingerprint`` and ``config``).
        stat_sizes (Mapping[str, int]): statistic key -> packed-sum length.
        standardize (str): the latent space's standardise mode.
        pipeline (tuple[dict, dict, dict]): the loader, view and packing
            transforms (:func:`~kiv.datasets.teacher_cache.split_pipeline`).
        views (int): views per image.
        seed (int): the views' seed.
        dtype (str): storage dtype name.
        shard_size (int): images per shard.
        per_view (int): bytes per cached view.

    Returns:
        dict: the index with ``complete=False``; its ``cache_id`` is the
        fingerprint of everything the shards' bytes depend on
        (:func:`cache_identity`).
    """
    loader, view, pack = pipeline
    ds_cfg = cfg.train_dataloader.dataset
    teacher_cfgs = cfg.model.teachers
    for name, entry in teachers.items():
        entry['fingerprint'] = teacher_fingerprint(teacher_cfgs[name])
        entry['config'] = config_to_json(teacher_cfgs[name])
    index = dict(
        format=CACHE_FORMAT,
        version=CACHE_VERSION,
        cache_id=None,
        complete=False,
        config=config_path,
        kiv_version=__version__,
        created=datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec='seconds'),
        views=views,
        seed=seed,
        dtype=dtype,
        shard_size=shard_size,
        num_shards=math.ceil(len(paths) / shard_size),
        loader=config_to_json(loader),
        view=view,
        pack=config_to_json(pack),
        dataset=dict(fingerprint=dataset_fingerprint(ds_cfg),
                     config=config_to_json({
                         k: v for k, v in ds_cfg.items()
                         if k != 'pipeline'})),
        images=dict(root=root, count=len(paths), file=IMAGES_FILE,
                    sha256=ImageList(paths).sha256()),
        teachers=teachers,
        standardize=standardize,
        statistics=dict(file=STATISTICS_FILE, numel=dict(stat_sizes)),
        bytes_per_view=per_view,
    )
    index['cache_id'] = fingerprint(cache_identity(index))
    return index


def cache_identity(index: Mapping) -> dict:
    """Everything the bytes of a cache's shards depend on (its
    ``cache_id`` is the fingerprint of this): teachers, views, images,
    storage, shard layout, statistics, and the caches reused teachers'
    outputs come from."""
    identity = dict(
        format=index['format'], version=index['version'],
        teachers={n: e['fingerprint']
                  for n, e in index['teachers'].items()},
        view=index['view'], loader=index['loader'], views=index['views'],
        seed=index['seed'], dtype=index['dtype'],
        images=index['images']['sha256'], shard_size=index['shard_size'],
        standardize=index['standardize'],
        statistic_keys=list(index['statistics']['numel']))
    reused = {n: e['reused_from']['cache_id']
              for n, e in index['teachers'].items() if 'reused_from' in e}
    if reused:  # a resumed run must take them from the same caches
        identity['reused'] = reused
    return identity


def mark_reused(index: dict, reused: Mapping[str, Mapping]) -> None:
    """Record in a plan the teachers whose outputs are copied from other
    caches and give the plan its new ``cache_id``.

    Args:
        index (dict): a plan of :func:`make_index`, changed in place.
        reused (Mapping[str, Mapping]): per teacher its source's ``cache``
            path and ``cache_id``
            (:meth:`~kiv.datasets.teacher_cache.reuse.ReusedTargets.describe`).
    """
    for name, source in reused.items():
        index['teachers'][name]['reused_from'] = dict(source)
    index['cache_id'] = fingerprint(cache_identity(index))


def shard_images(index: Mapping, shard: int) -> range:
    """The global image indices of shard ``shard``."""
    size = index['shard_size']
    return range(shard * size,
                 min((shard + 1) * size, index['images']['count']))


def estimate(index: Mapping, views: int,
             storage_dtype: torch.dtype) -> dict[str, Any]:
    """Disk use of the cache, from the measured shapes and the dtype.

    Returns:
        dict: ``per_teacher`` (bytes of one view per teacher),
        ``per_view`` (all teachers + view description),
        ``per_image`` (``K`` views), ``checks_per_shard`` (the
        rounding-check sums in each shard), ``num_shards``,
        ``num_images``, ``total`` (the shards without their few-KiB json
        headers; the index and image list come on top),
        ``statistics`` (the statistics file) and ``stats_per_shard``
        (each shard's statistic sums, a side file kept only until the
        cache is complete).
    """
    item = _item_size(storage_dtype)
    per_teacher = {}
    for name, entry in index['teachers'].items():
        n = entry['summary_dim'] or 0
        n += sum(d * h * w for d, (h, w) in zip(entry['feature_dims'],
                                                entry['grids']))
        per_teacher[name] = n * item
    stats = 8 * sum(index['statistics']['numel'].values())
    checks = 8 * sum(3 + d for e in index['teachers'].values()
                     for d in ([e['summary_dim']] if e['summary_dim']
                               is not None else []) + e['feature_dims'])
    num_images = index['images']['count']
    per_image = index['bytes_per_view'] * views
    return dict(per_teacher=per_teacher,
                per_view=index['bytes_per_view'],
                per_image=per_image,
                checks_per_shard=checks,
                stats_per_shard=stats,
                num_shards=index['num_shards'],
                num_images=num_images,
                total=num_images * per_image + index['num_shards'] * checks,
                statistics=stats)


def report(index: Mapping, out_dir: str, views: int, dtype: str,
           storage_dtype: torch.dtype) -> str:
    """The disk-use report printed before writing (and by --dry-run)."""
    est = estimate(index, views, storage_dtype)
    lines = [f'teacher cache {out_dir}: {est["num_images"]} images '
             f'x {views} views, {dtype}, '
             f'{est["num_shards"]} shards of {index["shard_size"]} '
             'images']
    for name, entry in index['teachers'].items():
        shapes = ([f'summary {entry["summary_dim"]}']
                  if entry['summary_dim'] is not None else [])
        shapes += [f'{d}x{h}x{w}' for d, (h, w) in
                   zip(entry['feature_dims'], entry['grids'])]
        lines.append(f'  {name:<12} {", ".join(shapes):<40} '
                     f'{format_bytes(est["per_teacher"][name])} per view')
    lines.append(f'  per view      {format_bytes(est["per_view"])} '
                 f'({est["per_view"]} B, incl. {VIEW_ROW_BYTES} B of '
                 'view parameters)')
    lines.append(f'  per image     {format_bytes(est["per_image"])} '
                 f'({views} views)')
    lines.append(f'  total         {format_bytes(est["total"])} '
                 f'({est["total"]} B) + statistics file '
                 f'{format_bytes(est["statistics"])}')
    lines.append(f'  while writing {format_bytes(est["stats_per_shard"])}'
                 ' more per shard (its float64 statistic sums, deleted '
                 'when the cache is complete)')
    return '\n'.join(lines)


def index_differences(old: Mapping, new: Mapping) -> list[str]:
    """What differs between an existing index and a new plan.

    Returns:
        list[str]: one sentence per difference; empty if the new plan may
        resume (or find complete) the existing cache.
    """
    diffs = []
    for name in sorted(set(old.get('teachers', {})) | set(new['teachers'])):
        a = old.get('teachers', {}).get(name, {}).get('fingerprint')
        b = new['teachers'].get(name, {}).get('fingerprint')
        if a is None:
            diffs.append(f'teacher {name!r} is not in the cache')
        elif b is None:
            diffs.append(f'the cache has teacher {name!r}, the config '
                         'does not')
        elif a != b:
            diffs.append(f'teacher {name!r} config differs')
        else:
            a = old['teachers'][name].get('reused_from', {}).get('cache_id')
            b = new['teachers'][name].get('reused_from', {}).get('cache_id')
            if a != b:
                diffs.append(f'teacher {name!r} is reused from another cache '
                             f'(cache {a!r}, now {b!r})')
    for key, what in (('views', 'views per image'), ('seed', 'seed'),
                      ('dtype', 'dtype'), ('shard_size', 'shard size'),
                      ('view', 'view transform'),
                      ('loader', 'image loader'),
                      ('standardize', 'standardize mode')):
        if old.get(key) != new[key]:
            diffs.append(f'{what}: cache {old.get(key)!r}, now '
                         f'{new[key]!r}')
    if old.get('images', {}).get('sha256') != new['images']['sha256']:
        diffs.append(f'image list differs (cache '
                     f'{old.get("images", {}).get("count")} images, now '
                     f'{new["images"]["count"]})')
    if old.get('cache_id') != new['cache_id'] and not diffs:
        diffs.append('cache id differs')
    return diffs
