"""``kiv_demo.PlainViTStudent``: a fully trainable plain ViT student.

The demo uses it twice: to *make* the general-purpose knowledge base (a
small DINOv2-like timm ViT distilled from a real pretrained classifier,
standing in for DINOv2, which cannot be downloaded here), and as the
"without knowledge preservation" ablation (the knowledge base unfrozen, no
adapter). It has the interface of :class:`~kiv.models.backbones.AdapterViT`
(``forward_features`` -> :class:`~kiv.structures.FeatureOutput` with a
4-level pyramid, ``embed_dim``, ``patch_size``, ``out_type``), so the
distiller and the mmpretrain / mmdet / mmseg configs take either.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor

from kiv.models.backbones import BaseViT, build_base_vit
from kiv.models.layers import (STRIDES, check_images, check_outputs, crop_to,
                               pad_to_patch_multiple, pretrained_to_init_cfg,
                               pyramid_sizes)
from kiv.structures import FeatureOutput

from .registry import MODELS

__all__ = ['PlainViTStudent']


def _rescale(channels: int, factor: float) -> nn.Module:
    """Resample a map by a power-of-two ``factor`` (ViTDet simple pyramid):
    2x2 transposed convs (GELU between) to upsample, max pooling down
    (``ceil_mode``: a side ``n`` becomes ``ceil(n / k)``, the ResNet
    convention)."""
    if factor == 1:
        return nn.Identity()
    if factor < 1:
        k = int(round(1 / factor))
        return nn.MaxPool2d(kernel_size=k, stride=k, ceil_mode=True)
    layers: list[nn.Module] = []
    for i in range(int(round(math.log2(factor)))):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.ConvTranspose2d(channels, channels, 2, stride=2))
    return nn.Sequential(*layers)


@MODELS.register_module()
class PlainViTStudent(BaseModule):
    """A plain ViT with a simple feature pyramid, every weight trainable.

    The final-norm patch tokens ``(B, C, H/p, W/p)`` are resampled to
    strides 4/8/16/32 (ViTDet's simple pyramid: transposed convs up, max
    pooling down) and normalised (GroupNorm with one group, i.e. LayerNorm
    over ``C, H, W``); the summary is the final-norm CLS token (mean patch
    token without one).

    Any input size works, as in :class:`~kiv.models.backbones.AdapterViT`:
    images are zero-padded (0 after normalisation, the data preprocessors'
    pad value) at the bottom and right to multiples of ``p``, and each level
    is cropped to the ResNet size ``(ceil(H / s), ceil(W / s))`` before its
    norm, so the result equals padding in the data preprocessor and
    cropping.

    Args:
        base (dict): the ViT, as ``AdapterViT(base=...)``: ``dict(type=
            'timm', model_name=..., checkpoint=None, model_kwargs=...)`` or
            ``dict(type='mmpretrain', ...)``. ``checkpoint`` initialises the
            ViT from a knowledge base (loaded strictly).
        frozen (bool): freeze every parameter and keep the module in eval
            mode (linear probing downstream). Defaults to False.
        out_indices (Sequence[int]): pyramid levels (0..3) :meth:`forward`
            returns. Defaults to ``(0, 1, 2, 3)``.
        out_type (str): ``'pyramid'``, ``'global'`` (``(summary,)``) or
            ``'both'``, as :class:`~kiv.models.backbones.AdapterViT`.
            Defaults to ``'pyramid'``.
        pretrained (str, optional): deprecated toolbox convention (mmseg
            passes ``model.pretrained`` here): a checkpoint path, turned into
            ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)`` with
            the toolboxes' deprecation warning. Defaults to None.
        init_cfg (dict, optional): e.g. ``dict(type='Pretrained',
            checkpoint=<exported student>)``; add ``prefix='backbone.'`` to
            load the backbone of a whole detector / segmentor checkpoint.
    """

    def __init__(self,
                 base: dict,
                 frozen: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 out_type: str = 'pyramid',
                 pretrained: str | None = None,
                 init_cfg: dict | list[dict] | None = None) -> None:
        init_cfg = pretrained_to_init_cfg('PlainViTStudent', pretrained,
                                          init_cfg)
        super().__init__(init_cfg=init_cfg)
        out_indices = check_outputs('PlainViTStudent', out_type,
                                    out_indices)
        self.out_type = out_type
        self.out_indices = out_indices
        self.frozen = frozen
        self.base: BaseViT = build_base_vit(base)
        #: width ``C`` of the summary and of every pyramid level.
        self.embed_dim = self.base.embed_dim
        #: patch size: inputs are zero-padded to multiples of it.
        self.patch_size = self.base.patch_size
        p = self.patch_size
        if p & (p - 1) or not 4 <= p <= 32:
            raise ValueError(f'PlainViTStudent: patch size {p} must be a '
                             'power of two in [4, 32] for the 4/8/16/32 '
                             'pyramid')
        self.rescales = nn.ModuleList(
            [_rescale(self.embed_dim, p / s) for s in STRIDES])
        self.out_norms = nn.ModuleList([
            build_norm_layer(dict(type='GN', num_groups=1),
                             self.embed_dim)[1] for _ in STRIDES
        ])
        if frozen:
            self.requires_grad_(False)
        self.train()

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of the maps :meth:`forward` returns (all ``embed_dim``).
        """
        return (self.embed_dim, ) * len(self.out_indices)

    def train(self, mode: bool = True) -> 'PlainViTStudent':
        """Set the train mode; a frozen student stays in eval mode."""
        return super().train(mode and not self.frozen)

    def _tokens(self, x: Tensor
                ) -> tuple[Tensor, tuple[int, int], tuple[int, int]]:
        """Final-norm tokens of the padded images, the patch grid and the
        input size ``(H, W)``."""
        image_size = check_images('PlainViTStudent', x)
        p = self.patch_size
        x = pad_to_patch_multiple(x, p)
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        return self.base.forward_tokens(x), grid, image_size

    def _summary(self, tokens: Tensor) -> Tensor:
        if self.base.has_class_token:
            return tokens[:, 0]
        return tokens[:, self.base.num_prefix_tokens:].mean(1)

    def _pyramid(self, tokens: Tensor, grid: tuple[int, int],
                 image_size: tuple[int, int]) -> tuple[Tensor, ...]:
        patches = tokens[:, self.base.num_prefix_tokens:]
        maps = patches.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        return tuple(
            norm(crop_to(rescale(maps), size)) for rescale, norm, size in zip(
                self.rescales, self.out_norms, pyramid_sizes(*image_size)))

    def forward_features(self, x: Tensor) -> FeatureOutput:
        """Summary and full pyramid (used by the distiller).

        Args:
            x (Tensor): normalised images ``(B, 3, H, W)``, any ``H, W``.

        Returns:
            FeatureOutput: ``summary (B, C)`` and four maps
            ``(B, C, ceil(H / s), ceil(W / s))`` for strides
            ``s = 4, 8, 16, 32``.
        """
        tokens, grid, image_size = self._tokens(x)
        return FeatureOutput(self._summary(tokens),
                             self._pyramid(tokens, grid, image_size))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Toolbox interface (as :meth:`AdapterViT.forward`).

        Args:
            x (Tensor): images ``(B, 3, H, W)``, any ``H, W``.

        Returns:
            tuple[Tensor, ...]: ``'pyramid'``: the maps at ``out_indices``
            (level ``l``: ``(B, C, ceil(H / s_l), ceil(W / s_l))``);
            ``'global'``: ``(summary (B, C),)``; ``'both'``: maps, then the
            summary.
        """
        tokens, grid, image_size = self._tokens(x)
        outs: tuple[Tensor, ...] = ()
        if self.out_type != 'global':
            maps = self._pyramid(tokens, grid, image_size)
            outs = tuple(maps[i] for i in self.out_indices)
        if self.out_type != 'pyramid':
            outs = outs + (self._summary(tokens), )
        return outs
