from .checkpoint import SAFE_GLOBALS, UnsafeCheckpointError, safe_torch_load
from .checkpoint_hook import SafeCheckpointHook
from . import atomic_files  # noqa: F401  atomic checkpoint writes
from . import hooks  # noqa: F401  registers kiv.BadImageReportHook
from .model_wrappers import CPUDistributedDataParallel

__all__ = [
    'SAFE_GLOBALS', 'UnsafeCheckpointError', 'safe_torch_load',
    'SafeCheckpointHook', 'CPUDistributedDataParallel'
]
