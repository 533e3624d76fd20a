"""kiv training hooks."""
from .bad_image_report_hook import (BadImageReportHook, skipped_files_in_batch,
                                    skipped_in_batch)

__all__ = ['BadImageReportHook', 'skipped_files_in_batch', 'skipped_in_batch']
from .statistics_warmup_hook import StatisticsWarmupHook  # noqa: E402

__all__ += ['StatisticsWarmupHook']
