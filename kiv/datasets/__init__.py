"""Unlabelled image data for distillation and its loading transforms."""
from .transforms import (DEFAULT_MAX_PIXELS, SKIP_CAUSES, SKIPPED_FILES,
                         ImageTooLargeError, LoadImageFromFileSafe,
                         PackImageInputs, UnreadableImageError, header_pixels,
                         to_bgr_uint8)
from .unlabeled_image_dataset import IMG_EXTENSIONS, UnlabeledImageDataset

__all__ = [
    'IMG_EXTENSIONS', 'SKIPPED_FILES', 'SKIP_CAUSES', 'DEFAULT_MAX_PIXELS',
    'ImageTooLargeError', 'LoadImageFromFileSafe', 'PackImageInputs',
    'UnlabeledImageDataset', 'UnreadableImageError', 'header_pixels',
    'to_bgr_uint8'
]
# offline teacher-feature cache (registers kiv.TeacherCacheDataset,
# kiv.ReplayView)
from .teacher_cache import (ReplayView, TeacherCacheDataset,  # noqa: E402
                            TeacherCacheError, TeacherCacheWriter,
                            use_teacher_cache)

__all__ += [
    'ReplayView', 'TeacherCacheDataset', 'TeacherCacheError',
    'TeacherCacheWriter', 'use_teacher_cache'
]
