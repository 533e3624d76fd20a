"""Inference-only rewrites of a frozen teacher, checked on random images."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from mmcv.cnn import fuse_conv_bn
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from .teacher import Teacher

__all__ = ['fuse_frozen_conv_bn']

#: outputs may move by this much of their largest magnitude (float32
#: rounding of the folded weights, accumulated over the network's depth)
FUSE_RTOL = 1e-3


def _outputs(teacher: Teacher, images: Tensor) -> list[tuple[str, Tensor]]:
    out = teacher(images)
    named = [(f'features[{i}]', f) for i, f in enumerate(out.features)]
    if out.summary is not None:
        named.insert(0, ('summary', out.summary))
    return named


def fuse_frozen_conv_bn(teacher: Teacher, probe_hw: Sequence[int],
                        rtol: float = FUSE_RTOL) -> None:
    """Fold the BatchNorms of a frozen teacher into their convolutions.

    mmcv's ``fuse_conv_bn`` folds a BatchNorm into the convolution that
    precedes it among its parent's children, which is the forward order in
    the usual ``conv -> bn`` blocks (ResNet, EfficientNet, mm
    ``ConvModule``) but not in every model. So the teacher's outputs on two
    random images are compared before and after; a change beyond rounding
    raises and leaves a message naming the output.

    Args:
        teacher (Teacher): a teacher in eval mode (its BatchNorms use their
            running statistics); fused in place.
        probe_hw (Sequence[int]): ``(H, W)`` of the random images.
        rtol (float): allowed change, relative to the output's largest
            magnitude. Defaults to :data:`FUSE_RTOL`.

    Raises:
        ValueError: a recorded layer is a BatchNorm (it disappears), or the
            outputs changed.
    """
    norms = {name for name, m in teacher.model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    recorded = [name for name in getattr(teacher.recorder, 'names', ())
                if name in norms]
    if recorded:
        raise ValueError(f'Teacher fuse_conv_bn: recorded layer '
                         f'{recorded[0]!r} is a BatchNorm, which fusing '
                         'removes; record its parent or the convolution')
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((2, teacher.mean.shape[1], *probe_hw),
                        generator=generator) * 255
    images = images.to(teacher.mean.device)
    before = _outputs(teacher, images)
    fuse_conv_bn(teacher.model)
    teacher.requires_grad_(False)  # the folded weights are new Parameters
    for (label, ref), (_, got) in zip(before, _outputs(teacher, images)):
        scale = float(ref.abs().max())
        error = float((got - ref).abs().max())
        if error > rtol * scale + 1e-6:
            raise ValueError(
                f'Teacher fuse_conv_bn changed the {label} output of '
                f'{type(teacher.model).__name__} (max change {error:.3g} '
                f'for values up to {scale:.3g}): one of its BatchNorms does '
                'not directly follow the convolution before it in the '
                'forward; use fuse_conv_bn=False')
