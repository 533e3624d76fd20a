"""``kiv.SimplePyramid``: ViTDet's simple feature pyramid as an mmdet neck.

"Exploring Plain Vision Transformer Backbones for Object Detection" (Li et
al., 2022) builds the multi-scale maps a detector needs from the single
stride-16 map of a plain ViT: deconvolutions up-sample it (strides 8 and 4),
max-pooling down-samples it (stride 32); each branch ends with a 1x1 and a
3x3 conv to ``out_channels``. No top-down or lateral fusion.

mmdet 3.3's pip package has no such neck (ViTDet's ``SimpleFPN`` lives in
mmdet's ``projects/``, which is not installed), so it is built here from
mmcv's ``ConvModule`` / ``build_norm_layer``. The output is a tuple of NCHW
maps like mmdet's ``FPN``, so RPN and RoI heads work unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor

from kiv.registry import MODELS

__all__ = ['SimplePyramid']

#: Supported re-scalings of the input map and the channels they keep.
_CHANNEL_DIVISORS = {4.0: 4, 2.0: 2, 1.0: 1, 0.5: 1}


@MODELS.register_module()
class SimplePyramid(BaseModule):
    """Simple feature pyramid from one backbone map (ViTDet).

    For the input map ``x`` of ``in_channels`` channels and stride ``s``
    (16 for ``kiv.AdapterViT``'s level 2), each ``scale_factors`` entry
    builds one level:

    - ``4.0``: deconv 2x2/2 (``C -> C/2``), norm, activation, deconv 2x2/2
      (``C/2 -> C/4``): stride ``s / 4``;
    - ``2.0``: deconv 2x2/2 (``C -> C/2``): stride ``s / 2``;
    - ``1.0``: ``x`` itself: stride ``s``;
    - ``0.5``: max-pool 2x2/2 (``ceil_mode``: a side ``n`` becomes
      ``ceil(n / 2)``, as the stride-32 level of a ResNet or of
      ``kiv.AdapterViT``): stride ``2 s``;

    then a 1x1 ``ConvModule`` to ``out_channels`` and a 3x3 ``ConvModule``
    (both with ``norm_cfg``, no activation). ``num_outs`` above the number
    of levels appends max-pooled (kernel 1, stride 2) copies of the last
    level, like mmdet's ``FPN`` with ``add_extra_convs=False`` (P6 for
    Mask R-CNN's 5 anchor strides).

    Args:
        in_channels (int): channels ``C`` of the backbone map (768 for a
            ViT-B student).
        out_channels (int): channels of every output level.
        in_index (int): which map of the backbone's output tuple to use.
            Defaults to 2: the stride-16 level of ``kiv.AdapterViT`` with
            its default ``out_indices=(0, 1, 2, 3)``.
        scale_factors (Sequence[float]): levels to build, each one of
            ``4.0, 2.0, 1.0, 0.5``, in decreasing order (highest resolution
            first). Defaults to ``(4.0, 2.0, 1.0, 0.5)``.
        num_outs (int): number of outputs, ``>= len(scale_factors)``.
            Defaults to 5.
        norm_cfg (dict): norm of the up-sampling branch and of the convs;
            ``dict(type='SyncBN')`` for multi-GPU training. Defaults to
            ``dict(type='BN')``.
        act_cfg (dict): activation between the two deconvolutions of the
            ``4.0`` branch. Defaults to ``dict(type='GELU')``.
        init_cfg (dict | list[dict], optional): mmengine init config. By
            default the 1x1/3x3 convs get ``ConvModule``'s Kaiming init and
            the deconvolutions PyTorch's default, as in ViTDet.

    Example:
        >>> neck = SimplePyramid(in_channels=768, out_channels=256)
        >>> feats = [torch.rand(1, 768, 64 // s, 64 // s)
        ...          for s in (4, 8, 16, 32)]  # kiv.AdapterViT pyramid
        >>> [tuple(o.shape[-2:]) for o in neck(feats)]
        [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 in_index: int = 2,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 num_outs: int = 5,
                 norm_cfg: dict = dict(type='BN'),
                 act_cfg: dict = dict(type='GELU'),
                 init_cfg: dict | list[dict] | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        scale_factors = tuple(float(s) for s in scale_factors)
        if not scale_factors or any(s not in _CHANNEL_DIVISORS
                                    for s in scale_factors) \
                or list(scale_factors) != sorted(set(scale_factors),
                                                 reverse=True):
            raise ValueError(
                f'SimplePyramid: scale_factors={list(scale_factors)} must be '
                f'distinct values of {sorted(_CHANNEL_DIVISORS, reverse=True)}'
                ' in decreasing order')
        if in_channels % 4 and 4.0 in scale_factors \
                or in_channels % 2 and 2.0 in scale_factors:
            raise ValueError(
                f'SimplePyramid: in_channels={in_channels} must be divisible '
                f'by the channel reduction of scale_factors={scale_factors} '
                '(4 for 4.0, 2 for 2.0)')
        if num_outs < len(scale_factors):
            raise ValueError(
                f'SimplePyramid: num_outs={num_outs} must be >= the '
                f'{len(scale_factors)} levels of scale_factors')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.in_index = in_index
        self.scale_factors = scale_factors
        self.num_outs = num_outs

        self.resamplers = nn.ModuleList(
            self._resampler(scale, in_channels, norm_cfg, act_cfg)
            for scale in scale_factors)
        self.lateral_convs = nn.ModuleList(
            ConvModule(
                in_channels // _CHANNEL_DIVISORS[scale],
                out_channels,
                1,
                norm_cfg=norm_cfg,
                act_cfg=None) for scale in scale_factors)
        self.fpn_convs = nn.ModuleList(
            ConvModule(
                out_channels,
                out_channels,
                3,
                padding=1,
                norm_cfg=norm_cfg,
                act_cfg=None) for _ in scale_factors)

    @staticmethod
    def _resampler(scale: float, channels: int, norm_cfg: dict,
                   act_cfg: dict) -> nn.Module:
        """The re-scaling branch of one level (see the class docstring)."""
        if scale == 4.0:
            half = channels // 2
            return nn.Sequential(
                nn.ConvTranspose2d(channels, half, 2, stride=2),
                build_norm_layer(norm_cfg, half)[1],
                build_activation_layer(act_cfg),
                nn.ConvTranspose2d(half, channels // 4, 2, stride=2))
        if scale == 2.0:
            return nn.ConvTranspose2d(channels, channels // 2, 2, stride=2)
        if scale == 1.0:
            return nn.Identity()
        return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Build the pyramid from ``inputs[in_index]``.

        Args:
            inputs (Sequence[Tensor]): the backbone's maps; the selected one
                is ``(B, in_channels, H, W)`` at stride ``s``.

        Returns:
            tuple[Tensor, ...]: ``num_outs`` maps ``(B, out_channels, h_i,
            w_i)``, highest resolution first: ``(H * f, W * f)`` for each
            scale factor ``f`` (rounded up for 0.5), then each extra level
            half the previous one (rounded up).
        """
        if not isinstance(inputs, (tuple, list)) or not -len(inputs) <= \
                self.in_index < len(inputs):
            got = f'{len(inputs)} maps' if isinstance(
                inputs, (tuple, list)) else type(inputs).__name__
            raise ValueError(
                f'SimplePyramid: in_index={self.in_index} does not select a '
                f'map of the backbone output ({got}); set the neck\'s '
                'in_index or the backbone\'s out_indices')
        x = inputs[self.in_index]
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'SimplePyramid: expected a (B, {self.in_channels}, H, W) '
                f'map at in_index={self.in_index}, got shape '
                f'{tuple(x.shape)}; set in_channels to the backbone width')
        outs = [
            fpn_conv(lateral_conv(resample(x)))
            for resample, lateral_conv, fpn_conv in zip(
                self.resamplers, self.lateral_convs, self.fpn_convs)
        ]
        for _ in range(self.num_outs - len(outs)):
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)
