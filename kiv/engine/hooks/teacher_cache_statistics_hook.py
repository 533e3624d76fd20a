"""Fix a model's standardiser statistics to a teacher cache's exact ones."""
from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.logging import print_log

from kiv.models.distillers.teacher_cache import fix_cache_statistics
from kiv.registry import HOOKS

__all__ = ['TeacherCacheStatisticsHook']


@HOOKS.register_module()
class TeacherCacheStatisticsHook(Hook):
    """Fix the standardiser statistics to a cache's exact ones.

    Not needed by cached configs: ``kiv.KnowledgeInheritance(
    teacher_cache=...)`` fixes them at construction. The hook does the same
    for a model that does not read the cache, before the first training
    iteration (e.g. an online run on the cached views, compared with a
    cached run). It does nothing when the statistics are already fixed (a
    cached model, a resumed run or ``load_from`` with fixed statistics) and
    runs before ``kiv.StatisticsWarmupHook``.

    Args:
        cache_dir (str): the cache directory.
    """

    priority = 'VERY_HIGH'

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir

    def before_train(self, runner) -> None:
        """Load the statistics unless the model already has fixed ones."""
        if fix_cache_statistics(runner.model, self.cache_dir):
            print_log('TeacherCacheStatisticsHook: statistics fixed from '
                      f'{self.cache_dir}', logger='current')
