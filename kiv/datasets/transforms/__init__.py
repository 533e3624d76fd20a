from .formatting import SKIPPED_FILES, PackImageInputs
from .loading import (LoadImageFromFileSafe, UnreadableImageError,
                      to_bgr_uint8)

__all__ = [
    'LoadImageFromFileSafe', 'PackImageInputs', 'SKIPPED_FILES',
    'UnreadableImageError', 'to_bgr_uint8'
]
