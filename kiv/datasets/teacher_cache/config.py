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
  teacher against the cache (:func:`cached_teachers`), builds a
  ``kiv.CachedTeacher`` in its place (no teacher weights are read) and
  fixes the standardiser statistics from the cache's statistics file at
  construction (:func:`fix_cache_statistics`);
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
from typing import Any

from mmengine.config import Config, ConfigDict
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch import Tensor

from kiv.registry import HOOKS
from .format import (STATISTICS_FILE, TeacherCacheError, config_to_json,
                     load_statistics, read_index)
from .views import split_pipeline
from .writer import dataset_fingerprint, teacher_fingerprint

__all__ = [
    'use_teacher_cache', 'TeacherCacheStatisticsHook', 'cached_teachers',
    'fix_cache_statistics', 'teacher_differences', 'dataset_differences',
    'teacher_cache_dir', 'online_config'
]

_CACHED_TYPES = ('CachedTeacher', 'kiv.CachedTeacher')
_DISTILLERS = ('KnowledgeInheritance', 'kiv.KnowledgeInheritance')
_CACHE_DATASETS = ('TeacherCacheDataset', 'kiv.TeacherCacheDataset')
_EVAL_KEYS = ('val_dataloader', 'val_cfg', 'val_evaluator', 'test_dataloader',
              'test_cfg', 'test_evaluator')


def _type_name(cfg: Any) -> str:
    return str(cfg.get('type', '')) if isinstance(cfg, Mapping) else ''


def _where(cache_dir: str, index: Mapping) -> str:
    return f'the teacher cache {cache_dir} (written from ' \
        f'{index.get("config")})'


# ------------------------------------------------------------------ checks --
def teacher_differences(index: Mapping, teachers: Mapping[str, Mapping],
                        standardize: str) -> list[str]:
    """What differs between a cache and a distiller's teachers.

    Args:
        index (Mapping): the cache's ``index.json``.
        teachers (Mapping[str, Mapping]): ``model.teachers`` (the real
            teacher configs, as when the cache was written).
        standardize (str): ``model.latent.standardize``.

    Returns:
        list[str]: one sentence per difference; empty if the cache belongs
        to these teachers.
    """
    diffs = []
    cached = index['teachers']
    for name, tcfg in teachers.items():
        if _type_name(tcfg) in _CACHED_TYPES:
            diffs.append(f'teacher {name!r} is already a kiv.CachedTeacher; '
                         'with teacher_cache give the real teacher config '
                         '(it is checked against the cache)')
        elif name not in cached:
            diffs.append(f'teacher {name!r} is not cached (the cache has '
                         f'{list(cached)})')
        elif teacher_fingerprint(tcfg) != cached[name]['fingerprint']:
            diffs.append(f'teacher {name!r} config differs from the cached '
                         'one')
    if standardize != index['standardize']:
        diffs.append(f'latent.standardize={standardize!r}, the cache '
                     f'statistics are for {index["standardize"]!r}')
    return diffs


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


# ----------------------------------------------------------- model side --
def cached_teachers(teachers: Mapping[str, Mapping], cache_dir: str,
                    standardize: str = 'phis',
                    task_heads: Mapping | None = None) -> dict[str, dict]:
    """``kiv.CachedTeacher`` configs in place of a distiller's teachers.

    ``kiv.KnowledgeInheritance(teacher_cache=...)`` calls it before building
    its teachers, so no teacher model is built and no teacher weight file is
    opened, under any entry point.

    Args:
        teachers (Mapping[str, Mapping]): ``model.teachers``, the real
            teacher configs (checked against the cache's fingerprints).
        cache_dir (str): the cache directory.
        standardize (str): ``model.latent.standardize``. Defaults to
            ``'phis'`` (``kiv.SharedLatentSpace``'s default).
        task_heads (Mapping, optional): ``model.task_heads``; must be empty
            (the cache stores teacher targets, not labels).

    Returns:
        dict[str, dict]: teacher name -> ``dict(type='kiv.CachedTeacher',
        cache_dir=cache_dir, name=name)``.

    Raises:
        TeacherCacheError: ``task_heads`` given, no complete cache at
            ``cache_dir``, or a cache that does not belong to these teachers
            (one message naming every difference).
    """
    if task_heads:
        raise TeacherCacheError(
            f'model.teacher_cache={cache_dir!r} cannot train task_heads: the '
            'cache stores teacher targets, not labels; drop model.task_heads '
            'or train online')
    index = read_index(cache_dir)
    diffs = teacher_differences(index, teachers, standardize)
    if diffs:
        raise TeacherCacheError(
            f'{_where(cache_dir, index)} does not belong to model.teachers '
            '(model.teacher_cache): ' + '; '.join(diffs))
    print_log(f'KnowledgeInheritance: teachers {list(teachers)} read from '
              f'the teacher cache {cache_dir} ({index["num_samples"]} views '
              f'of {index["images"]["count"]} images; kiv.CachedTeacher, no '
              'teacher weights loaded)', logger='current')
    return {name: dict(type='kiv.CachedTeacher', cache_dir=cache_dir,
                       name=name) for name in teachers}


def cache_statistics(cache_dir: str) -> tuple[dict[str, Tensor], dict]:
    """The exact standardiser sums of all the targets of a cache.

    Args:
        cache_dir (str): the cache directory.

    Returns:
        tuple[dict[str, Tensor], dict]: the packed float64 sums (see
        :func:`~kiv.datasets.teacher_cache.load_statistics`) and the index.
    """
    index = read_index(cache_dir)
    return load_statistics(osp.join(cache_dir, STATISTICS_FILE),
                           index['cache_id']), index


def fix_cache_statistics(model: Any, cache_dir: str) -> bool:
    """Fix a distiller's standardiser statistics to a cache's exact ones.

    PHI-S is computed once from all the cached targets, the targets never
    move, and the base teacher's heads start as its standardiser. Does
    nothing for ``statistics='ema'`` latent spaces or when the statistics
    are already fixed. A later ``load_from`` / ``--resume`` still replaces
    them with the checkpoint's (trained heads keep their statistics).

    Args:
        model: a ``kiv.KnowledgeInheritance`` (``latent`` and
            ``load_statistics``), or a model wrapper of one.
        cache_dir (str): the cache directory.

    Returns:
        bool: whether the statistics were loaded.

    Raises:
        TypeError: not a ``kiv.KnowledgeInheritance``.
        TeacherCacheError: the statistics do not fit the model (another
            latent configuration than the cache's).
    """
    model = model.module if is_model_wrapper(model) else model
    latent = getattr(model, 'latent', None)
    if latent is None or not hasattr(model, 'load_statistics'):
        raise TypeError('teacher-cache statistics need a '
                        'kiv.KnowledgeInheritance model, got '
                        f'{type(model).__name__}')
    if getattr(latent, 'statistics', 'fixed') != 'fixed' or \
            latent.statistics_ready:
        return False
    sums, index = cache_statistics(cache_dir)
    try:
        model.load_statistics(sums)
    except KeyError as err:
        raise TeacherCacheError(
            f'{_where(cache_dir, index)}: its statistics do not fit '
            f'model.latent: {err}') from err
    print_log(f'fixed the statistics of {len(sums)} teacher outputs from all '
              f'{index["num_samples"]} cached views of {cache_dir}',
              logger='current')
    return True


@HOOKS.register_module()
class TeacherCacheStatisticsHook(Hook):
    """Fix the standardiser statistics to a cache's exact ones.

    Not needed by cached configs: ``kiv.KnowledgeInheritance(
    teacher_cache=...)`` fixes them at construction. The hook does the same
    for a model that does not read the cache, before the first training
    iteration (e.g. an online run on the cached views, compared with a
    cached run). It does nothing when the statistics are already fixed (a
    cached model, a resumed run or ``load_from`` with fixed statistics) and
    runs before ``kiv.StatisticsWarmupHook``.

    Args:
        cache_dir (str): the cache directory.
    """

    priority = 'VERY_HIGH'

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir

    def before_train(self, runner) -> None:
        """Load the statistics unless the model already has fixed ones."""
        if fix_cache_statistics(runner.model, self.cache_dir):
            print_log('TeacherCacheStatisticsHook: statistics fixed from '
                      f'{self.cache_dir}', logger='current')


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
        if _type_name(dataset) in _CACHE_DATASETS else None,
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
    if _type_name(dataset) in _CACHE_DATASETS:
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
    if _type_name(model) not in _DISTILLERS:
        raise TeacherCacheError(
            f'teacher_cache={cache_dir!r} needs a kiv.KnowledgeInheritance '
            f'model, the config has {_type_name(model or {})!r}')
    teachers = model.get('teachers') or {}
    if teachers and all(_type_name(t) in _CACHED_TYPES
                        for t in teachers.values()):
        return cfg  # rewritten by an older kiv: kiv.CachedTeacher configs
    if model.get('task_heads'):
        raise TeacherCacheError(
            'teacher_cache cannot train task_heads: the cache stores teacher '
            'targets, not labels; drop model.task_heads or train online')
    index = read_index(cache_dir)
    dataset = cfg.train_dataloader.dataset
    cached_dataset = _type_name(dataset) in _CACHE_DATASETS
    source = dataset.get('dataset', None) if cached_dataset else dataset
    diffs = teacher_differences(
        index, teachers,
        (model.get('latent') or {}).get('standardize', 'phis'))
    if source:
        diffs += dataset_differences(index, source)
    if diffs:
        raise TeacherCacheError(f'{_where(cache_dir, index)} does not belong '
                                'to this config: ' + '; '.join(diffs))

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
