"""Distil from the cache under any entry point: the config is the run.

A cached distillation config names the cache where it is consumed, so it
trains from the cache whether it is run by kiv's ``tools/train.py``, by
mmpretrain's / mmdet's own ``tools/train.py`` or by ``Runner.from_cfg``::

    teacher_cache = 'work_dirs/teacher_cache/<name>'
    model = dict(teacher_cache=teacher_cache)      # kiv.KnowledgeInheritance
    train_dataloader = dict(dataset=dict(
        _delete_=True, type='kiv.TeacherCacheDataset',
        cache_dir=teacher_cache,
        dataset={{_base_.train_dataloader.dataset}}))
    val_dataloader = val_cfg = val_evaluator = None   # and test_*

* ``kiv.KnowledgeInheritance(teacher_cache=...)`` checks every configured
  teacher against the cache, builds a ``kiv.CachedTeacher`` in its place
  (no teacher weights are read) and fixes the standardiser statistics from
  the cache's statistics file at construction
  (:mod:`kiv.models.distillers.teacher_cache`);
* ``kiv.TeacherCacheDataset(dataset=...)`` checks that the cache was
  written from ``dataset`` (:func:`dataset_differences`) and reads the
  images from where ``dataset`` says they are now.

:func:`use_teacher_cache` (``tools/train.py --teacher-cache DIR``, or a
config with only the top-level ``teacher_cache``) writes those places
consistently; :func:`online_config` undoes them for the cache writer.
"""
from __future__ import annotations

import copy
import os.path as osp
from collections.abc import Mapping

from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

from kiv.fileio.teacher_cache_format import (TeacherCacheError,
                                             config_to_json, read_index)
from kiv.fileio.teacher_cache_identity import (CACHED_TEACHER_TYPES,
                                               config_type,
                                               dataset_fingerprint,
                                               describe_cache,
                                               teacher_differences)
from .views import split_pipeline

__all__ = [
    'use_teacher_cache', 'dataset_differences', 'teacher_cache_dir',
    'online_config'
]

_DISTILLERS = ('KnowledgeInheritance', 'kiv.KnowledgeInheritance')
_CACHE_DATASETS = ('TeacherCacheDataset', 'kiv.TeacherCacheDataset')
_EVAL_KEYS = ('val_dataloader', 'val_cfg', 'val_evaluator', 'test_dataloader',
              'test_cfg', 'test_evaluator')


# ------------------------------------------------------------------ checks --
def dataset_differences(index: Mapping, dataset: Mapping) -> list[str]:
    """What differs between a cache and the dataset it should come from.

    Args:
        index (Mapping): the cache's ``index.json``.
        dataset (Mapping): the training dataset config the cache was written
            from (``kiv.TeacherCacheDataset``'s ``dataset``). Where the data
            lives (``data_root``, ``data_prefix``) may differ.

    Returns:
        list[str]: one sentence per difference (dataset type and files, the
        image loader, the view transform); empty if it belongs.
    """
    diffs = []
    if dataset_fingerprint(dataset) != index['dataset']['fingerprint']:
        diffs.append('train_dataloader.dataset differs (ann_file, '
                     'extensions, type ...)')
    try:
        loader, view, _ = split_pipeline(dataset.get('pipeline', []))
    except TeacherCacheError as err:
        diffs.append(f'the train pipeline cannot be replayed: {err}')
    else:
        if config_to_json(loader) != index['loader']:
            diffs.append(f'the image loader {config_to_json(loader)} '
                         f'differs from the cached {index["loader"]}')
        if view != index['view']:
            diffs.append(f'the train pipeline gives views {view}, the cache '
                         f'has {index["view"]}')
    return diffs


# ----------------------------------------------------------- config side --
def teacher_cache_dir(cfg: Config) -> str | None:
    """The teacher cache a config trains from, if any.

    Args:
        cfg (Config): any config.

    Returns:
        str | None: the one directory named by ``teacher_cache``,
        ``model.teacher_cache`` and ``train_dataloader.dataset.cache_dir``
        (of a ``kiv.TeacherCacheDataset``); None if none is set.

    Raises:
        TeacherCacheError: they name different directories.
    """
    model = cfg.get('model', None)
    loader = cfg.get('train_dataloader', None)
    dataset = loader.get('dataset', None) \
        if isinstance(loader, Mapping) else None
    places = {
        'teacher_cache': cfg.get('teacher_cache', None),
        'model.teacher_cache': model.get('teacher_cache', None)
        if isinstance(model, Mapping) else None,
        'train_dataloader.dataset.cache_dir': dataset.get('cache_dir', None)
        if config_type(dataset) in _CACHE_DATASETS else None,
    }
    given = {k: v for k, v in places.items() if v}
    if len({osp.normpath(v) for v in given.values()}) > 1:
        raise TeacherCacheError(
            'the config names different teacher caches: ' + ', '.join(
                f'{k}={v!r}' for k, v in given.items()) +
            '; set them together (tools/train.py --teacher-cache DIR)')
    return next(iter(given.values()), None)


def online_config(cfg: Config) -> Config:
    """The online config a cached config was made from.

    What ``tools/cache_teachers.py`` writes a cache from: a copy of ``cfg``
    without ``model.teacher_cache`` and with ``train_dataloader.dataset``
    the ``dataset`` of its ``kiv.TeacherCacheDataset``. An online config is
    returned as a copy, unchanged.

    Args:
        cfg (Config): a distillation config, cached or not.

    Returns:
        Config: a new config.

    Raises:
        TeacherCacheError: a ``kiv.TeacherCacheDataset`` without ``dataset``
            (nothing to cache from).
    """
    cfg = copy.deepcopy(cfg)
    model = cfg.get('model', None)
    if isinstance(model, Mapping) and 'teacher_cache' in model:
        model.pop('teacher_cache')
    loader = cfg.get('train_dataloader', None)
    dataset = loader.get('dataset', None) \
        if isinstance(loader, Mapping) else None
    if config_type(dataset) in _CACHE_DATASETS:
        if not dataset.get('dataset', None):
            raise TeacherCacheError(
                'train_dataloader.dataset is a kiv.TeacherCacheDataset '
                'without `dataset`: set train_dataloader.dataset.dataset to '
                'the dataset the cache is written from')
        loader['dataset'] = dataset['dataset']
    return cfg


def use_teacher_cache(cfg: Config, cache_dir: str | None = None) -> Config:
    """Make a distillation config train from a cache, under any entry point.

    ``tools/train.py`` calls it when the config names a cache (or with
    ``--teacher-cache DIR`` / ``--cfg-options teacher_cache=DIR``, which
    replace the config's). It checks, before anything is built, that the
    cache belongs to the config (the same teachers with the same configs,
    the standardise mode, the dataset, image loader and views), then sets,
    in place:

    * ``teacher_cache`` and ``model.teacher_cache`` to the cache:
      ``kiv.KnowledgeInheritance`` builds ``kiv.CachedTeacher`` stand-ins
      (no teacher weights are read) and fixes the statistics from the
      cache;
    * ``train_dataloader.dataset`` to ``kiv.TeacherCacheDataset`` over all
      cached views, its ``dataset`` the config's own one (its image folder is
      used, so data may move); the sampler, batch size and workers stay;
    * validation and testing off: they compare the student with the real
      teachers on other images (run ``tools/test.py`` with the online
      config).

    The result is an ordinary config that trains from the cache with any
    entry point (it is what ``tools/train.py`` dumps to the work dir).

    Args:
        cfg (Config): a ``kiv.KnowledgeInheritance`` config, modified in
            place.
        cache_dir (str, optional): the cache. Defaults to the one the config
            names (:func:`teacher_cache_dir`).

    Returns:
        Config: ``cfg``.

    Raises:
        TeacherCacheError: no cache given, the config names different
            caches, ``task_heads``, or a cache that does not belong to this
            config (one message naming every difference).
    """
    cache_dir = cache_dir or teacher_cache_dir(cfg)
    if not cache_dir:
        raise TeacherCacheError('use_teacher_cache: no cache directory (set '
                                "teacher_cache='<dir>' in the config)")
    model = cfg.get('model')
    if config_type(model) not in _DISTILLERS:
        raise TeacherCacheError(
            f'teacher_cache={cache_dir!r} needs a kiv.KnowledgeInheritance '
            f'model, the config has {config_type(model or {})!r}')
    teachers = model.get('teachers') or {}
    if teachers and all(config_type(t) in CACHED_TEACHER_TYPES
                        for t in teachers.values()):
        return cfg  # rewritten by an older kiv: kiv.CachedTeacher configs
    if model.get('task_heads'):
        raise TeacherCacheError(
            'teacher_cache cannot train task_heads: the cache stores teacher '
            'targets, not labels; drop model.task_heads or train online')
    index = read_index(cache_dir)
    dataset = cfg.train_dataloader.dataset
    cached_dataset = config_type(dataset) in _CACHE_DATASETS
    source = dataset.get('dataset', None) if cached_dataset else dataset
    diffs = teacher_differences(
        index, teachers,
        (model.get('latent') or {}).get('standardize', 'phis'))
    if source:
        diffs += dataset_differences(index, source)
    if diffs:
        raise TeacherCacheError(
            f'{describe_cache(cache_dir, index)} does not belong to this '
            'config: ' + '; '.join(diffs))

    cfg.teacher_cache = cache_dir
    model.teacher_cache = cache_dir
    if cached_dataset:
        dataset.cache_dir = cache_dir
    else:
        cfg.train_dataloader.dataset = ConfigDict(
            type='kiv.TeacherCacheDataset', cache_dir=cache_dir,
            teachers=list(teachers), dataset=dataset)
    for key in _EVAL_KEYS:
        if cfg.get(key, None) is not None:
            cfg[key] = None
    print_log(f'training from the teacher cache {cache_dir}: '
              f'{index["num_samples"]} views of {index["images"]["count"]} '
              f'images, teachers {list(teachers)} (no teacher weights '
              'loaded; validation off)', logger='current')
    return cfg
