"""kiv's runtime hooks: every ``mmengine.hooks.Hook`` of kiv is here.

- :class:`SafeCheckpointHook`: checkpoints loadable with
  ``weights_only=True``, global random states restored on resume;
- :class:`NonFiniteLossHook`: a NaN/Inf loss never reaches the weights;
- :class:`BadImageReportHook`: unreadable images reported by cause;
- :class:`StatisticsWarmupHook`: exact standardiser statistics before
  distillation;
- :class:`TeacherCacheStatisticsHook`: the statistics of a teacher cache;
- :class:`InheritedCalibrationHook`: the label-free calibration of the
  inherited heads, after the last step.
"""
from .bad_image_report_hook import (BadImageReportHook, skipped_files_in_batch,
                                    skipped_in_batch)
from .inherited_calibration_hook import InheritedCalibrationHook
from .nonfinite_loss_hook import (NonFiniteLossError, NonFiniteLossHook,
                                  NonFiniteWeightsError, nonfinite_terms)
from .safe_checkpoint_hook import SafeCheckpointHook
from .statistics_warmup_hook import StatisticsWarmupHook
from .teacher_cache_statistics_hook import TeacherCacheStatisticsHook

__all__ = [
    'BadImageReportHook', 'skipped_files_in_batch', 'skipped_in_batch',
    'NonFiniteLossHook', 'NonFiniteLossError', 'NonFiniteWeightsError',
    'nonfinite_terms', 'SafeCheckpointHook', 'StatisticsWarmupHook',
    'TeacherCacheStatisticsHook', 'InheritedCalibrationHook'
]
