"""One switch to distil from the cache: ``teacher_cache = '<dir>'``."""
from __future__ import annotations

import os.path as osp
from collections.abc import Mapping

from mmengine.config import Config, ConfigDict
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import DefaultScope

from kiv.registry import DATASETS, HOOKS
from .format import (STATISTICS_FILE, TeacherCacheError, load_statistics,
                     read_index, to_plain)
from .views import split_pipeline
from .writer import dataset_fingerprint, teacher_fingerprint

__all__ = ['use_teacher_cache', 'TeacherCacheStatisticsHook']

_CACHED_TYPES = ('CachedTeacher', 'kiv.CachedTeacher')
_DISTILLERS = ('KnowledgeInheritance', 'kiv.KnowledgeInheritance')


@HOOKS.register_module()
class TeacherCacheStatisticsHook(Hook):
    """Fix the standardiser statistics to the cache's exact ones.

    Before the first training iteration, loads ``statistics.safetensors``
    of the cache (the sums over every cached target) into
    ``KnowledgeInheritance.load_statistics``: PHI-S is computed once from
    all the data, the targets never move, and the base teacher's heads start
    as its standardiser. Runs before ``kiv.StatisticsWarmupHook`` (which
    then has nothing to do) and does nothing when the statistics are
    already fixed (a resumed run or ``load_from`` restores them with the
    trained heads, which must not be re-initialised).

    Args:
        cache_dir (str): the cache directory.
    """

    priority = 'VERY_HIGH'

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir

    def before_train(self, runner) -> None:
        """Load the statistics unless the model already has fixed ones."""
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        latent = getattr(model, 'latent', None)
        if latent is None or not hasattr(model, 'load_statistics'):
            raise TypeError('TeacherCacheStatisticsHook needs a '
                            'kiv.KnowledgeInheritance model, got '
                            f'{type(model).__name__}')
        if getattr(latent, 'statistics', 'fixed') != 'fixed' or \
                latent.statistics_ready:
            return
        index = read_index(self.cache_dir)
        sums = load_statistics(osp.join(self.cache_dir, STATISTICS_FILE),
                               index['cache_id'])
        model.load_statistics(sums)
        print_log(
            f'TeacherCacheStatisticsHook: fixed the statistics of '
            f'{len(sums)} teacher outputs from all {index["num_samples"]} '
            f'cached views of {self.cache_dir}', logger='current')


def _type_name(cfg: Mapping) -> str:
    return str(cfg.get('type', ''))


def use_teacher_cache(cfg: Config, cache_dir: str | None = None) -> Config:
    """Turn a distillation config into one that trains from a cache.

    ``tools/train.py`` calls it when the config sets ``teacher_cache``.
    Checks that the cache belongs to the config (the same teachers with the
    same configs, the same views and images, the standardise mode), then
    rewrites, in place:

    * every ``model.teachers[<name>]`` into ``kiv.CachedTeacher`` (no
      teacher weights are built or read);
    * ``train_dataloader.dataset`` into ``kiv.TeacherCacheDataset`` over
      all cached views (image folder from the config's dataset, so data may
      move); the sampler, batch size and workers stay;
    * ``custom_hooks`` gain ``kiv.TeacherCacheStatisticsHook`` (exact
      statistics of all the cached targets, fixed before step 0);
    * validation and testing are turned off: they compare the student with
      the real teachers on other images (run ``tools/test.py`` with the
      original config).

    Args:
        cfg (Config): a ``kiv.KnowledgeInheritance`` config, modified in
            place.
        cache_dir (str, optional): the cache. Defaults to
            ``cfg.teacher_cache``.

    Returns:
        Config: ``cfg``.

    Raises:
        TeacherCacheError: no cache given, or a cache that does not belong
            to this config (the message names what differs).
    """
    cache_dir = cache_dir or cfg.get('teacher_cache', None)
    if not cache_dir:
        raise TeacherCacheError('use_teacher_cache: no cache directory (set '
                                "teacher_cache='<dir>' in the config)")
    model = cfg.get('model')
    if not isinstance(model, Mapping) or \
            _type_name(model) not in _DISTILLERS:
        raise TeacherCacheError(
            f'teacher_cache={cache_dir!r} needs a kiv.KnowledgeInheritance '
            f'model, the config has {_type_name(model or {})!r}')
    teachers = model.get('teachers') or {}
    if teachers and all(_type_name(t) in _CACHED_TYPES
                        for t in teachers.values()):
        return cfg  # already applied
    if model.get('task_heads'):
        raise TeacherCacheError(
            'teacher_cache cannot train task_heads: the cache stores teacher '
            'targets, not labels; drop model.task_heads or train online')
    index = read_index(cache_dir)
    where = f'the teacher cache {cache_dir} (written from ' \
            f'{index.get("config")})'

    diffs = []
    cached = index['teachers']
    for name, tcfg in teachers.items():
        if name not in cached:
            diffs.append(f'teacher {name!r} is not cached (the cache has '
                         f'{list(cached)})')
        elif teacher_fingerprint(tcfg) != cached[name]['fingerprint']:
            diffs.append(f'teacher {name!r} config differs from the cached '
                         'one')
    standardize = model.get('latent', {}).get('standardize', 'phis')
    if standardize != index['standardize']:
        diffs.append(f'latent.standardize={standardize!r}, the cache '
                     f'statistics are for {index["standardize"]!r}')
    ds_cfg = cfg.train_dataloader.dataset
    if dataset_fingerprint(ds_cfg) != index['dataset']['fingerprint']:
        diffs.append('train_dataloader.dataset differs (ann_file, '
                     'extensions, type ...)')
    try:
        loader, view, _ = split_pipeline(ds_cfg.get('pipeline', []))
    except TeacherCacheError as err:
        diffs.append(f'the train pipeline cannot be replayed: {err}')
    else:
        if to_plain(loader) != index['loader']:
            diffs.append(f'the image loader {to_plain(loader)} differs from '
                         f'the cached {index["loader"]}')
        if view != index['view']:
            diffs.append(f'the train pipeline gives views {view}, the cache '
                         f'has {index["view"]}')
    if diffs:
        raise TeacherCacheError(f'{where} does not belong to this config: '
                                + '; '.join(diffs))

    # the config's image folder (data may have moved since caching)
    scope = cfg.get('default_scope', None) or 'kiv'
    lazy = ConfigDict({**ds_cfg, 'pipeline': [], 'lazy_init': True})
    try:
        with DefaultScope.overwrite_default_scope(scope):
            img_root = getattr(DATASETS.build(lazy), 'img_dir', None)
    except (TypeError, ValueError, FileNotFoundError):
        img_root = None
    if img_root is None or not index['images']['root']:
        img_root = index['images']['root']

    model.teachers = {
        name: dict(type='kiv.CachedTeacher', cache_dir=cache_dir, name=name)
        for name in teachers
    }
    cfg.train_dataloader.dataset = dict(
        type='kiv.TeacherCacheDataset', cache_dir=cache_dir,
        teachers=list(teachers), img_root=img_root,
        pipeline=[index['loader'], index['view'], index['pack']])
    hooks = [h for h in (cfg.get('custom_hooks', None) or [])
             if _type_name(h).rsplit('.', 1)[-1] !=
             'TeacherCacheStatisticsHook']
    hooks.append(dict(type='kiv.TeacherCacheStatisticsHook',
                      cache_dir=cache_dir))
    cfg.custom_hooks = hooks
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator',
                'test_dataloader', 'test_cfg', 'test_evaluator'):
        if cfg.get(key, None) is not None:
            cfg[key] = None
    cfg.teacher_cache = cache_dir
    print_log(f'training from the teacher cache {cache_dir}: '
              f'{index["num_samples"]} views of {index["images"]["count"]} '
              f'images, teachers {list(teachers)} (no teacher weights '
              'loaded; validation off)', logger='current')
    return cfg
