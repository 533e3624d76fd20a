"""kiv's engine: safe checkpoint I/O, hooks, launch helpers, wrappers.

Importing it registers kiv's hooks and wrappers and changes nothing global;
:func:`enable_safe_io` is the one explicit switch for weights-only loading
and atomic writes in mmengine (see :mod:`kiv.engine.safe_io`).
"""
from . import hooks  # noqa: F401  registers kiv.BadImageReportHook ...
from kiv.utils.checkpoint import (SAFE_GLOBALS, UnsafeCheckpointError,
                                  safe_torch_load)
from .checkpoint_hook import SafeCheckpointHook
from .model_wrappers import CPUDistributedDataParallel
from .nonfinite import (NonFiniteLossError, NonFiniteLossHook,
                        NonFiniteWeightsError)
from .safe_io import disable_safe_io, enable_safe_io, safe_io_enabled

__all__ = [
    'SAFE_GLOBALS', 'UnsafeCheckpointError', 'safe_torch_load',
    'SafeCheckpointHook', 'CPUDistributedDataParallel', 'enable_safe_io',
    'disable_safe_io', 'safe_io_enabled', 'NonFiniteLossHook',
    'NonFiniteLossError', 'NonFiniteWeightsError'
]
