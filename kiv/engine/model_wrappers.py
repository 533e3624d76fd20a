"""Model wrappers for distributed runs on CPU (gloo)."""
from __future__ import annotations

from mmengine.model import MMDistributedDataParallel

from kiv.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` for modules that live on the CPU.

    mmengine's Runner always passes ``device_ids=[LOCAL_RANK]``, which torch's
    DDP rejects for CPU modules. This wrapper drops it; everything else
    (``train_step``/``val_step`` through the data preprocessor, gradient
    all-reduce over gloo) is mmengine's.

    Args:
        module (nn.Module): model on the CPU.
        device_ids: ignored (must be ``None`` for CPU modules).
        **kwargs: passed to :class:`MMDistributedDataParallel`.
    """

    def __init__(self, module, device_ids=None, **kwargs) -> None:
        super().__init__(module=module, device_ids=None, **kwargs)
