"""Offline teacher-feature cache (Theia-style shards).

``tools/cache_teachers.py CONFIG`` runs every teacher of a distillation
config once over its train images (``K`` seeded views per image) and writes
safetensors shards, an index and the exact standardiser statistics
(:class:`TeacherCacheWriter`). ``teacher_cache = '<dir>'`` in the config
(:func:`use_teacher_cache`) then trains from the cache with no teacher in
memory: :class:`TeacherCacheDataset` replays every cached view
(:class:`ReplayView`) with its targets and ``kiv.CachedTeacher`` hands them
to the distiller. See ``docs/teacher_cache.md``.
"""
from .config import TeacherCacheStatisticsHook, use_teacher_cache
from .dataset import CACHE_ID, CACHED_TARGETS, TeacherCacheDataset
from .format import (STORAGE_DTYPES, ImageList, TeacherCacheError,
                     load_statistics, read_index)
from .views import ReplayView, ViewParams, split_pipeline, view_rng
from .writer import TeacherCacheWriter, format_bytes

__all__ = [
    'TeacherCacheWriter', 'TeacherCacheDataset', 'ReplayView', 'ViewParams',
    'TeacherCacheError', 'TeacherCacheStatisticsHook', 'use_teacher_cache',
    'load_statistics', 'read_index', 'split_pipeline', 'view_rng',
    'format_bytes', 'ImageList', 'STORAGE_DTYPES', 'CACHED_TARGETS',
    'CACHE_ID'
]
