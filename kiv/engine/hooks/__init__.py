"""kiv training hooks."""
from .bad_image_report_hook import (BadImageReportHook, skipped_files_in_batch,
                                    skipped_in_batch)

__all__ = ['BadImageReportHook', 'skipped_files_in_batch', 'skipped_in_batch']
from .statistics_warmup_hook import StatisticsWarmupHook  # noqa: E402
from .teacher_cache_statistics_hook import \
    TeacherCacheStatisticsHook  # noqa: E402

__all__ += ['StatisticsWarmupHook', 'TeacherCacheStatisticsHook']
