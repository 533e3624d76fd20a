"""File formats shared by kiv's layers.

The teacher-feature cache is written and read by ``kiv.datasets`` and read
by ``kiv.models`` (``kiv.CachedTeacher``, the distiller's statistics): its
format (:mod:`.teacher_cache_format`: index, shards, image list, statistics
file) and what ties it to a config (:mod:`.teacher_cache_identity`:
fingerprints, the teacher check) live here, below both, with the CLIP
text-embedding file of the zero-shot heads (:mod:`.text_embeddings`).
Nothing here imports ``kiv.models``, ``kiv.datasets`` or ``kiv.engine``.
"""
from .teacher_cache_format import (CACHE_ID, CACHED_TARGETS, STORAGE_DTYPES,
                                   ImageList, TeacherCacheError,
                                   cache_statistics, load_statistics,
                                   read_index)
from .teacher_cache_identity import (dataset_fingerprint, teacher_differences,
                                     teacher_fingerprint)
from .text_embeddings import (TextEmbeddings, TextEmbeddingsError,
                              load_text_embeddings, save_text_embeddings)

__all__ = [
    'CACHE_ID', 'CACHED_TARGETS', 'STORAGE_DTYPES', 'ImageList',
    'TeacherCacheError', 'cache_statistics', 'load_statistics', 'read_index',
    'dataset_fingerprint', 'teacher_differences', 'teacher_fingerprint',
    'TextEmbeddings', 'TextEmbeddingsError', 'load_text_embeddings',
    'save_text_embeddings'
]
