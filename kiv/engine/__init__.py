from .checkpoint import (RUNNER_CHECKPOINT_GLOBALS, UnsafeCheckpointError,
                         safe_torch_load)
from .model_wrappers import CPUDistributedDataParallel

__all__ = [
    'RUNNER_CHECKPOINT_GLOBALS', 'UnsafeCheckpointError', 'safe_torch_load',
    'CPUDistributedDataParallel'
]
