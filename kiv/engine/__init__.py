"""kiv's engine, the runtime pieces: hooks (:mod:`.hooks`), optimizer
wrapper constructors (:mod:`.optimizers`), model wrappers, the random state
a resumed run gets back, and safe checkpoint I/O. The command-line plumbing
of kiv's tools is in :mod:`kiv.apis`.

Importing it registers kiv's hooks and wrappers and changes nothing global;
:func:`enable_safe_io` is the one explicit switch for weights-only loading
and atomic writes in mmengine (see :mod:`kiv.engine.safe_io`).
"""
from kiv.utils.checkpoint import (SAFE_GLOBALS, UnsafeCheckpointError,
                                  safe_torch_load)
from . import hooks  # noqa: F401  registers kiv.BadImageReportHook ...
from . import optimizers  # noqa: F401  kiv.GroupedOptimWrapperConstructor
from .hooks import (NonFiniteLossError, NonFiniteLossHook,
                    NonFiniteWeightsError, SafeCheckpointHook)
from .model_wrappers import CPUDistributedDataParallel
from .safe_io import disable_safe_io, enable_safe_io, safe_io_enabled

__all__ = [
    'SAFE_GLOBALS', 'UnsafeCheckpointError', 'safe_torch_load',
    'SafeCheckpointHook', 'CPUDistributedDataParallel', 'enable_safe_io',
    'disable_safe_io', 'safe_io_enabled', 'NonFiniteLossHook',
    'NonFiniteLossError', 'NonFiniteWeightsError'
]
