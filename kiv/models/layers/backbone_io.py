"""What a kiv backbone takes and returns, whatever its architecture.

Shared by ``kiv.AdapterViT`` and any other student backbone (the demo's
plain ViT): the image batch check, zero-padding to whole patches, the
ResNet-convention pyramid sizes ``ceil(H / s)`` at strides 4-32 and the crop
to them, the ``out_type`` / ``out_indices`` options, and mmseg's / mmdet's
``pretrained=`` backbone argument as an ``init_cfg``.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'OUT_TYPES', 'STRIDES', 'check_outputs', 'check_images',
    'pad_to_patch_multiple', 'pyramid_sizes', 'crop_to',
    'pretrained_to_init_cfg'
]

#: what a kiv backbone's ``forward`` returns (see ``AdapterViT``)
OUT_TYPES = ('pyramid', 'global', 'both')


def check_outputs(owner: str, out_type: str,
                  out_indices: Sequence[int]) -> tuple[int, ...]:
    """Validate a backbone's ``out_type`` and ``out_indices`` options.

    Args:
        owner (str): class name for the error message.
        out_type (str): one of :data:`OUT_TYPES`.
        out_indices (Sequence[int]): pyramid levels to return, in 0..3.

    Returns:
        tuple[int, ...]: ``out_indices`` as a tuple.

    Raises:
        ValueError: naming the option and the accepted values.
    """
    if out_type not in OUT_TYPES:
        raise ValueError(f"{owner}: out_type='{out_type}' is not one of "
                         f'{OUT_TYPES}')
    out_indices = tuple(out_indices)
    if not out_indices or any(i not in range(4) for i in out_indices):
        raise ValueError(f'{owner}: out_indices={out_indices} must be a '
                         'non-empty subset of the levels 0..3')
    return out_indices


#: strides of the pyramid levels 0..3 (the ResNet C2..C5 convention)
STRIDES = (4, 8, 16, 32)


def check_images(owner: str, x: Tensor) -> tuple[int, int]:
    """Check that ``x`` is a batch of images and return its ``(H, W)``.

    Args:
        owner (str): class name for the error message.
        x (Tensor): the backbone input.

    Returns:
        tuple[int, int]: ``(H, W)``.

    Raises:
        ValueError: if ``x`` is not ``(B, C, H, W)``.
    """
    if x.dim() != 4:
        raise ValueError(f'{owner} expects images (B, C, H, W), got a '
                         f'tensor of shape {tuple(x.shape)}')
    return int(x.shape[-2]), int(x.shape[-1])


def pad_to_patch_multiple(x: Tensor, patch_size: int) -> Tensor:
    """Zero-pad images at the bottom and right to multiples of the patch.

    The idea of timm's ``dynamic_img_pad``: a ViT backbone takes any input
    size. The pad value is 0 *after* normalisation, the value mmengine's
    ``ImgDataPreprocessor`` (and so mmdet's, mmseg's and mmpretrain's data
    preprocessors) pad batches with, so the backbone's own padding cannot be
    told apart from a data preprocessor's ``pad_size_divisor=patch_size``.

    Args:
        x (Tensor): normalised images ``(B, C, H, W)``.
        patch_size (int): the ViT patch size ``p``.

    Returns:
        Tensor: ``(B, C, ceil(H / p) * p, ceil(W / p) * p)``; ``x`` itself
        when ``H`` and ``W`` are multiples of ``p``.
    """
    pad_h = -x.shape[-2] % patch_size
    pad_w = -x.shape[-1] % patch_size
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


def pyramid_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Map sizes of the pyramid levels for an ``height x width`` input.

    The ResNet convention that mmdet necks and mmseg heads expect: level
    ``l`` at stride ``s = 4, 8, 16, 32`` is ``(ceil(H / s), ceil(W / s))``.

    Args:
        height (int): input height ``H``.
        width (int): input width ``W``.

    Returns:
        list[tuple[int, int]]: four ``(h, w)``, strides 4 to 32.
    """
    return [(math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]


def crop_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Keep the top-left ``size`` of an NCHW map.

    Args:
        x (Tensor): ``(B, C, h, w)`` with ``h >= size[0]``, ``w >= size[1]``.
        size (tuple[int, int]): ``(h', w')``.

    Returns:
        Tensor: ``(B, C, h', w')`` (``x`` itself if the size is the same).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return x[..., :size[0], :size[1]]


#: mmcv model-zoo schemes: weights of other architectures (ResNets ...).
_MODEL_ZOO_SCHEMES = ('open-mmlab://', 'openmmlab://', 'torchvision://',
                      'mmcls://', 'mmpretrain://')


def pretrained_to_init_cfg(owner: str, pretrained: str | None,
                           init_cfg: dict | list[dict] | None
                           ) -> dict | list[dict] | None:
    """mmseg / mmdet's ``pretrained=`` backbone argument as an ``init_cfg``.

    mmseg's ``EncoderDecoder`` passes ``model.pretrained`` to the backbone as
    ``pretrained=``; the toolboxes' own backbones (mmseg's
    ``VisionTransformer``, mmdet's ``ResNet``) turn a string into
    ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)`` with a
    deprecation warning. This does the same, with errors that name the
    options.

    Args:
        owner (str): class name for messages.
        pretrained (str, optional): a checkpoint path or URL.
        init_cfg (dict | list[dict], optional): the backbone's ``init_cfg``.

    Returns:
        dict | list[dict] | None: the ``init_cfg`` to use.

    Raises:
        TypeError: if ``pretrained`` is neither a string nor None.
        ValueError: if both ``pretrained`` and ``init_cfg`` are set, or
            ``pretrained`` names model-zoo weights of another architecture
            (e.g. the ``open-mmlab://resnet50_v1c`` of upstream mmseg
            configs).
    """
    if pretrained is None:
        return init_cfg
    if not isinstance(pretrained, str):
        raise TypeError(f'{owner}: pretrained must be a str (checkpoint '
                        f'path) or None, got {type(pretrained).__name__}')
    hint = ('mmseg passes model.pretrained to the backbone; set '
            'model.pretrained=None to load the backbone from its init_cfg, '
            'or to the exported kiv student file')
    if init_cfg is not None:
        raise ValueError(
            f'{owner}: pretrained={pretrained!r} and init_cfg={init_cfg!r} '
            f'are both set; use one ({hint})')
    if pretrained.startswith(_MODEL_ZOO_SCHEMES):
        raise ValueError(
            f'{owner}: pretrained={pretrained!r} names model-zoo weights of '
            f'another architecture, which cannot initialise {owner} '
            f'({hint})')
    warnings.warn('DeprecationWarning: pretrained is deprecated, '
                  'please use "init_cfg" instead')
    return dict(type='Pretrained', checkpoint=pretrained)
