"""What ties a teacher-feature cache to the config it was written from.

A cache's ``index.json`` records fingerprints of every teacher config and of
the train dataset config (:func:`teacher_fingerprint`,
:func:`dataset_fingerprint`). The writer (``kiv.datasets``) records them; the
distiller (``kiv.models``, through ``kiv.CachedTeacher``) and
``use_teacher_cache`` check a config against them
(:func:`teacher_differences`), so both layers import this module and it
imports neither.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .teacher_cache_format import fingerprint

__all__ = [
    'CACHED_TEACHER_TYPES', 'config_type', 'teacher_fingerprint',
    'dataset_fingerprint', 'teacher_differences', 'describe_cache'
]

#: ``type`` of a teacher config that already reads a cache.
CACHED_TEACHER_TYPES = ('CachedTeacher', 'kiv.CachedTeacher')
#: dataset config keys that only say *where* the images are (ignored when
#: checking that a cache belongs to a config: data may move).
_LOCATION_KEYS = ('data_root', 'data_prefix', 'pipeline', 'backend_args',
                  'lazy_init', 'serialize_data', 'max_refetch')


def config_type(cfg: Any) -> str:
    """The ``type`` of a config dict as a string (``''`` if it has none)."""
    return str(cfg.get('type', '')) if isinstance(cfg, Mapping) else ''


def teacher_fingerprint(teacher_cfg: Mapping) -> str:
    """Fingerprint of one teacher's config (source, preprocessing, dtype).

    Args:
        teacher_cfg (dict): ``model.teachers[<name>]``.

    Returns:
        str: 16 hex digits.
    """
    return fingerprint(teacher_cfg)


def dataset_fingerprint(dataset_cfg: Mapping) -> str:
    """Fingerprint of a train dataset config, ignoring where the data lives
    (``data_root``, ``data_prefix``) and the pipeline (checked separately).

    Args:
        dataset_cfg (dict): ``train_dataloader.dataset``.

    Returns:
        str: 16 hex digits.
    """
    return fingerprint({k: v for k, v in dataset_cfg.items()
                        if k not in _LOCATION_KEYS})


def describe_cache(cache_dir: str, index: Mapping) -> str:
    """``'the teacher cache <dir> (written from <config>)'``, for messages.
    """
    return f'the teacher cache {cache_dir} (written from ' \
        f'{index.get("config")})'


def teacher_differences(index: Mapping, teachers: Mapping[str, Mapping],
                        standardize: str | None) -> list[str]:
    """What differs between a cache and a distiller's teachers.

    Args:
        index (Mapping): the cache's ``index.json``.
        teachers (Mapping[str, Mapping]): ``model.teachers`` (the real
            teacher configs, as when the cache was written).
        standardize (str, optional): ``model.latent.standardize``; None
            when the run does not take its statistics from the cache (e.g.
            ``kiv.StatisticsWarmupHook`` over the cached targets): not
            compared.

    Returns:
        list[str]: one sentence per difference; empty if the cache belongs
        to these teachers.
    """
    diffs = []
    cached = index['teachers']
    for name, tcfg in teachers.items():
        if config_type(tcfg) in CACHED_TEACHER_TYPES:
            diffs.append(f'teacher {name!r} is already a kiv.CachedTeacher; '
                         'with teacher_cache give the real teacher config '
                         '(it is checked against the cache)')
        elif name not in cached:
            diffs.append(f'teacher {name!r} is not cached (the cache has '
                         f'{list(cached)})')
        elif teacher_fingerprint(tcfg) != cached[name]['fingerprint']:
            diffs.append(f'teacher {name!r} config differs from the cached '
                         'one')
    if standardize is not None and standardize != index['standardize']:
        diffs.append(f'latent.standardize={standardize!r}, the cache '
                     f'statistics are for {index["standardize"]!r}')
    return diffs
