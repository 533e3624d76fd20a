"""Computing in true IEEE float32 under mixed precision.

:func:`fp32_compute` is what the shared latent space's standardisers and the
knowledge-preservation skip path of its s2t heads run in: their exactness is
what the step-0 guarantees (the student's loss for the knowledge base is 0)
rely on, so neither autocast nor TF32 / bf16 float32 kernels may touch them.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch

__all__ = ['fp32_compute', 'autocast_enabled']

#: ``torch.backends`` precision switches of float32 matmuls / convolutions
#: per device type (``fp32_precision``: ``'ieee'``, ``'tf32'``, ``'bf16'``
#: or ``'none'`` = inherit).
_PRECISION_SWITCHES: dict[str, tuple[tuple[str, str], ...]] = {
    'cuda': (('cuda', 'matmul'), ('cudnn', 'conv'), ('cudnn', 'rnn')),
    'cpu': (('mkldnn', 'matmul'), ('mkldnn', 'conv')),
}


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is enabled for ``device_type`` right now.

    Args:
        device_type (str): e.g. ``'cuda'`` or ``'cpu'``.

    Returns:
        bool: True inside an enabled ``torch.autocast`` of that device.
    """
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == 'cpu':
            return torch.is_autocast_cpu_enabled()
        return device_type == 'cuda' and torch.is_autocast_enabled()


def _switches(device_type: str) -> list[object]:
    """The ``fp32_precision`` switch objects of ``device_type`` that this
    torch has (older versions have none, only the ``allow_tf32`` flags).

    Args:
        device_type (str): e.g. ``'cuda'`` or ``'cpu'``.

    Returns:
        list: e.g. ``torch.backends.mkldnn.matmul`` on the CPU.
    """
    found = []
    for backend, op in _PRECISION_SWITCHES.get(device_type, ()):
        obj = getattr(getattr(torch.backends, backend, None), op, None)
        if obj is not None and hasattr(obj, 'fp32_precision'):
            found.append(obj)
    return found


@contextmanager
def fp32_compute(device_type: str) -> Iterator[None]:
    """Run a block in true IEEE float32.

    Disables autocast for ``device_type`` and, for the duration of the block
    only, sets the float32 precision of that device's matmul and
    convolution kernels to IEEE (``fp32_precision = 'ieee'``): no TF32 on
    CUDA (cuDNN convolutions default to TF32), no bf16 oneDNN kernels on
    CPU (``torch.set_float32_matmul_precision('medium')`` selects them on
    CPUs with AMX / AVX512-BF16). The previous settings are restored on
    exit. Inputs must be cast to float32 by the caller (autocast no longer
    does it). Used by the standardisers and the knowledge-preservation skip
    path of the s2t heads, whose exactness the step-0 guarantees rely on.

    The switches are process-global (like ``torch.backends`` itself): do
    not run a model in several Python threads at once (``DataParallel``)
    with other code relying on TF32 in the same moment.

    Args:
        device_type (str): device type of the tensors, e.g. ``'cuda'``.

    Yields:
        None
    """
    with ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type, enabled=False))
        switches = _switches(device_type)
        if switches:
            saved = [(obj, obj.fp32_precision) for obj in switches
                     if obj.fp32_precision != 'ieee']
            for obj, _ in saved:
                obj.fp32_precision = 'ieee'
            stack.callback(_restore_precision, saved)
        elif device_type == 'cuda':  # older torch: the legacy switches
            saved = [(obj, obj.allow_tf32) for obj in (
                torch.backends.cuda.matmul, torch.backends.cudnn)
                     if obj.allow_tf32]
            for obj, _ in saved:
                obj.allow_tf32 = False
            stack.callback(_restore_precision, saved, 'allow_tf32')
        yield


def _restore_precision(saved: list[tuple[object, object]],
                       attr: str = 'fp32_precision') -> None:
    """Set ``attr`` of every switch back to its saved value."""
    for obj, value in reversed(saved):
        setattr(obj, attr, value)
