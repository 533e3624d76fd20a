"""How the distiller reads a teacher-feature cache.

``kiv.KnowledgeInheritance(teacher_cache=...)`` checks every configured
teacher against the cache and builds a ``kiv.CachedTeacher`` in its place
(:func:`cached_teachers`: no teacher weights are read), then fixes the
standardiser statistics from the cache's statistics file
(:func:`fix_cache_statistics`), so a cached config trains from the cache
under any entry point (docs/teacher_cache.md).
``kiv.TeacherCacheStatisticsHook`` does the latter for models that do not
read the cache.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from kiv.fileio.teacher_cache_format import (TeacherCacheError,
                                             cache_statistics, read_index)
from kiv.fileio.teacher_cache_identity import (describe_cache,
                                               teacher_differences)

__all__ = ['cached_teachers', 'fix_cache_statistics']


def cached_teachers(teachers: Mapping[str, Mapping], cache_dir: str,
                    standardize: str | None = 'phis',
                    task_heads: Mapping | None = None,
                    keep_heads: Sequence[str] = ()) -> dict[str, dict]:
    """``kiv.CachedTeacher`` configs in place of a distiller's teachers.

    ``kiv.KnowledgeInheritance(teacher_cache=...)`` calls it before building
    its teachers, so no teacher model is built and no teacher weight file is
    opened, under any entry point, except for the teachers of
    ``keep_heads``: their stand-in builds the real teacher once and keeps
    its head (logit distillation through it).

    Args:
        teachers (Mapping[str, Mapping]): ``model.teachers``, the real
            teacher configs (checked against the cache's fingerprints).
        cache_dir (str): the cache directory.
        standardize (str, optional): ``model.latent.standardize``, checked
            against the cache's statistics; None if the run estimates its
            own (not checked). Defaults to ``'phis'``
            (``kiv.SharedLatentSpace``'s default).
        task_heads (Mapping, optional): ``model.task_heads``; must be empty
            (the cache stores teacher targets, not labels).
        keep_heads (Sequence[str]): teachers whose stand-in keeps the real
            teacher's head (``head_from``).

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
            f'{describe_cache(cache_dir, index)} does not belong to '
            'model.teachers (model.teacher_cache): ' + '; '.join(diffs))
    print_log(f'KnowledgeInheritance: teachers {list(teachers)} read from '
              f'the teacher cache {cache_dir} ({index["num_samples"]} views '
              f'of {index["images"]["count"]} images; kiv.CachedTeacher, no '
              'teacher weights loaded)', logger='current')
    out = {name: dict(type='kiv.CachedTeacher', cache_dir=cache_dir,
                      name=name) for name in teachers}
    for name in keep_heads:
        out[name]['head_from'] = dict(teachers[name])
    return out


def fix_cache_statistics(model: Any, cache_dir: str) -> bool:
    """Fix a distiller's standardiser statistics to a cache's exact ones.

    PHI-S is computed once from all the cached targets, the targets never
    move, and the base teacher's heads start as its standardiser. The
    model may distil a subset of the cache's teachers (each output's sums
    are its own). Does nothing for ``statistics='ema'`` latent spaces or
    when the statistics are already fixed. A later ``load_from`` /
    ``--resume`` still replaces them with the checkpoint's (trained heads
    keep their statistics).

    Args:
        model: a ``kiv.KnowledgeInheritance`` (``latent`` and
            ``load_statistics``), or a model wrapper of one.
        cache_dir (str): the cache directory.

    Returns:
        bool: whether the statistics were loaded.

    Raises:
        TypeError: not a ``kiv.KnowledgeInheritance``.
        TeacherCacheError: the statistics do not fit the model (another
            standardise mode, or an output the cache does not hold).
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
    mode = getattr(latent, 'standardize', index.get('standardize'))
    if index.get('standardize') != mode:
        raise TeacherCacheError(
            f'{describe_cache(cache_dir, index)}: its statistics are '
            f'standardize={index.get("standardize")!r} sums, the model\'s '
            f'latent space standardize={mode!r}')
    keys = latent.statistic_keys()
    try:
        model.load_statistics({k: sums[k] for k in keys if k in sums})
    except KeyError as err:
        raise TeacherCacheError(
            f'{describe_cache(cache_dir, index)}: its statistics do not fit '
            f'model.latent: {err}') from err
    print_log(f'fixed the statistics of {len(sums)} teacher outputs from all '
              f'{index["num_samples"]} cached views of {cache_dir}',
              logger='current')
    return True
