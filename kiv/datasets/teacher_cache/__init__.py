"""Offline teacher-feature cache (Theia-style shards).

``tools/cache_teachers.py CONFIG`` runs every teacher of a distillation
config once over its train images (``K`` seeded views per image) and writes
safetensors shards, an index and the exact standardiser statistics
(:class:`TeacherCacheWriter`). ``teacher_cache = '<dir>'`` in the config
(:func:`use_teacher_cache`) then trains from the cache with no teacher in
memory: :class:`TeacherCacheDataset` replays every cached view
(:class:`ReplayView`) with its targets and ``kiv.CachedTeacher`` hands them
to the distiller. The file format itself is :mod:`kiv.fileio` (the models
read it too). See ``docs/teacher_cache.md``.
"""
from kiv.fileio.teacher_cache_format import (CACHE_ID, CACHED_TARGETS,
                                             STORAGE_DTYPES, ImageList,
                                             TeacherCacheError,
                                             load_statistics, read_index)
from .config import use_teacher_cache
from .dataset import TeacherCacheDataset
from .views import ReplayView, ViewParams, split_pipeline, view_rng
from .plan import format_bytes
from .writer import TeacherCacheWriter

__all__ = [
    'TeacherCacheWriter', 'TeacherCacheDataset', 'ReplayView', 'ViewParams',
    'TeacherCacheError', 'use_teacher_cache', 'load_statistics',
    'read_index', 'split_pipeline', 'view_rng', 'format_bytes', 'ImageList',
    'STORAGE_DTYPES', 'CACHED_TARGETS', 'CACHE_ID'
]
