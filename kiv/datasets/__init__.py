"""Unlabelled image data for distillation and its loading transforms."""
from .transforms import (SKIPPED_FILES, LoadImageFromFileSafe, PackImageInputs,
                         UnreadableImageError, to_bgr_uint8)
from .unlabeled_image_dataset import IMG_EXTENSIONS, UnlabeledImageDataset

__all__ = [
    'IMG_EXTENSIONS', 'SKIPPED_FILES', 'LoadImageFromFileSafe',
    'PackImageInputs', 'UnlabeledImageDataset', 'UnreadableImageError',
    'to_bgr_uint8'
]
