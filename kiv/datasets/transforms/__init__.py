from .formatting import SKIP_CAUSES, SKIPPED_FILES, PackImageInputs
from .loading import (DEFAULT_MAX_PIXELS, ImageTooLargeError,
                      LoadImageFromFileSafe, UnreadableImageError,
                      header_pixels, to_bgr_uint8)

__all__ = [
    'LoadImageFromFileSafe', 'PackImageInputs', 'SKIPPED_FILES',
    'SKIP_CAUSES', 'UnreadableImageError', 'ImageTooLargeError',
    'DEFAULT_MAX_PIXELS', 'header_pixels', 'to_bgr_uint8'
]
