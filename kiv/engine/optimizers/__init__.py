"""Optimizer wrapper constructors.

:mod:`.grouped_constructor` (``kiv.GroupedOptimWrapperConstructor``) is
registered on import. :mod:`.layer_decay_constructor` imports mmpretrain,
so it is not imported here: ``kiv.OPTIM_WRAPPER_CONSTRUCTORS`` finds it on
first lookup, or a config imports it (``custom_imports``).
"""
from .grouped_constructor import (GroupedOptimWrapperConstructor,
                                  merge_param_groups)

__all__ = ['GroupedOptimWrapperConstructor', 'merge_param_groups']
