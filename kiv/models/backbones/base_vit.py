"""Frozen base ViTs for the adapter backbone.

:class:`~kiv.models.backbones.AdapterViT` keeps the general-purpose
teacher's ViT (DINOv2 in the real recipe) with its weights and wraps it in a
trainable adapter. The adapter needs only a few things from the ViT, so the
two supported implementations are put behind one small interface,
:class:`BaseViT`:

- ``embed(x)``: patch embedding, prefix tokens (CLS + registers) and position
  embeddings interpolated to the input's patch grid;
- ``blocks``: the transformer blocks, each ``(B, N, C) -> (B, N, C)``;
- ``norm``: the final norm;
- ``num_prefix_tokens``, ``has_class_token``, ``patch_size``, ``embed_dim``.

Implementations:

- :class:`TimmBaseViT`: ``timm`` ``VisionTransformer`` models
  (``vit_base_patch14_reg4_dinov2``, ``vit_base_patch16_clip_224``, ...),
  built with ``dynamic_img_size=True`` and loaded through the model module's
  ``checkpoint_filter_fn`` (official DINOv2 / OpenAI CLIP layouts convert on
  the fly).
- :class:`MMPretrainBaseViT`: ``mmpretrain.models.backbones.VisionTransformer``
  loaded from an mmpretrain backbone or classifier checkpoint.

Weights are read and loaded like the teachers' (:mod:`kiv.utils.state_dict`:
``weights_only=True``, strictly) at construction, so a wrapper is
complete as soon as it exists. Wrappers are plain ``nn.Module`` s without
``init_weights``: mmengine's recursive ``init_weights`` never reaches (and so
never re-initialises) the pretrained base.
"""
from __future__ import annotations

import inspect
import math
import warnings
from abc import ABCMeta, abstractmethod
from typing import Any, Mapping, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import Tensor

from kiv.registry import MODELS
from kiv.utils.state_dict import (load_state_dict_checked, read_state_dict,
                                  select_part)
from kiv.utils.timm_weights import load_timm_checkpoint

__all__ = [
    'BaseViT', 'TimmBaseViT', 'MMPretrainBaseViT', 'build_base_vit',
    'check_outputs', 'check_images', 'pad_to_patch_multiple',
    'pyramid_sizes', 'crop_to', 'pretrained_to_init_cfg', 'STRIDES'
]

#: Stateless stand-in for a missing final norm.
_IDENTITY = nn.Identity()


class BaseViT(nn.Module, metaclass=ABCMeta):
    """Common interface of a (frozen) plain ViT used by the adapter.

    Attributes:
        model (nn.Module): the wrapped library model; its parameters appear
            in the state dict under ``model.``.
        embed_dim (int): token width ``C``.
        patch_size (int): side of the square patches ``p``.
        num_prefix_tokens (int): tokens before the patch tokens (CLS and
            register tokens).
        has_class_token (bool): whether token 0 is a CLS token.
    """

    model: nn.Module
    embed_dim: int
    patch_size: int
    num_prefix_tokens: int
    has_class_token: bool

    @property
    @abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, each mapping ``(B, N, C)`` to itself."""

    @property
    @abstractmethod
    def norm(self) -> nn.Module:
        """The final norm (``nn.Identity`` if the model has none)."""

    @abstractmethod
    def embed(self, x: Tensor) -> Tensor:
        """Tokens entering the first block.

        Args:
            x (Tensor): images ``(B, 3, H, W)``, ``H`` and ``W`` multiples of
                :attr:`patch_size`.

        Returns:
            Tensor: ``(B, num_prefix_tokens + H/p * W/p, C)``: prefix tokens,
            then patch tokens in row-major order, with position embeddings
            interpolated to the ``(H/p, W/p)`` grid.
        """

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """The plain base model: embed, all blocks, final norm.

        Args:
            x (Tensor): images ``(B, 3, H, W)``.

        Returns:
            Tensor: ``(B, N, C)`` tokens, as the library's own forward
            computes them (timm ``forward_features``; mmpretrain ``raw``).
        """
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        """Alias of :meth:`forward_tokens`."""
        return self.forward_tokens(x)


def _square_patch(size: Any, what: str) -> int:
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if size[0] != size[1]:
        raise ValueError(f'{what}: AdapterViT needs square patches, got '
                         f'patch size {size}')
    return int(size[0])


@MODELS.register_module()
class TimmBaseViT(BaseViT):
    """A timm ``VisionTransformer`` as base ViT.

    Built with ``timm.create_model(model_name, pretrained=False,
    dynamic_img_size=True, num_classes=0, **model_kwargs)``; nothing is
    downloaded.

    Args:
        model_name (str): timm model name, e.g.
            ``'vit_base_patch14_reg4_dinov2'``.
        checkpoint (str, optional): local weights file: a timm state dict or
            any layout the model module's ``checkpoint_filter_fn`` converts
            (official DINOv2 ``dinov2_vitb14_reg4_pretrain.pth``, OpenAI
            CLIP, OpenCLIP ...), ``.pth`` or ``.safetensors``. Loaded
            strictly, through the same path as timm teachers.
            ``None`` keeps timm's random initialisation.
        model_kwargs (dict, optional): more ``create_model`` arguments
            (``img_size``, ``embed_dim``, ``depth``, ``drop_path_rate`` ...).
        drop_keys (Sequence[str]): regexes of file entries the base does not
            use, e.g. ``[r'^mask_token$']`` for DINOv2's original file or
            ``[r'^head\\.']`` for a classifier checkpoint (the base has no
            head). Anything else the file holds must load.
    """

    _RESERVED = ('pretrained', 'dynamic_img_size', 'num_classes')

    def __init__(self,
                 model_name: str,
                 checkpoint: str | None = None,
                 model_kwargs: dict | None = None,
                 drop_keys: Sequence[str] = ()) -> None:
        super().__init__()
        self.drop_keys = list(drop_keys)
        model_kwargs = dict(model_kwargs or {})
        reserved = [k for k in self._RESERVED if k in model_kwargs]
        if reserved:
            raise ValueError(
                f'base.model_kwargs must not set {reserved}: AdapterViT '
                'builds the timm model with pretrained=False, '
                'dynamic_img_size=True, num_classes=0 (weights come from '
                'base.checkpoint)')
        self.model = timm.create_model(
            model_name,
            pretrained=False,
            dynamic_img_size=True,
            num_classes=0,
            **model_kwargs)
        if not isinstance(self.model, TimmViT):
            raise ValueError(
                f"base.model_name='{model_name}' builds a timm "
                f'{type(self.model).__name__}; AdapterViT supports timm '
                'VisionTransformer models')
        self.model_name = model_name
        self.embed_dim = self.model.embed_dim
        self.patch_size = _square_patch(self.model.patch_embed.patch_size,
                                        f"timm model '{model_name}'")
        self.num_prefix_tokens = self.model.num_prefix_tokens
        self.has_class_token = bool(self.model.has_class_token)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    @property
    def norm(self) -> nn.Module:
        return self.model.norm

    def load_checkpoint(self, filename: str) -> None:
        """Load ``filename`` strictly through timm's checkpoint filter.

        The same loading path as the timm teachers
        (:func:`kiv.utils.timm_weights.load_timm_checkpoint`):
        ``.pth`` read weights-only or ``.safetensors``, timm's filter for the
        official layouts, and nothing in the file dropped unless
        ``drop_keys`` names it.

        Args:
            filename (str): local checkpoint path.
        """
        load_timm_checkpoint(self.model, self.model_name, filename,
                             drop_keys=self.drop_keys)

    def embed(self, x: Tensor) -> Tensor:
        m = self.model
        x = m.patch_embed(x)  # (B, H/p, W/p, C): dynamic_img_size -> NHWC
        x = m._pos_embed(x)  # prefix tokens + interpolated pos embed
        x = m.patch_drop(x)
        return m.norm_pre(x)


@MODELS.register_module()
class MMPretrainBaseViT(BaseViT):
    """An mmpretrain ``VisionTransformer`` as base ViT.

    Args:
        arch (str | dict): mmpretrain arch name (``'b'``, ``'dinov2-s'`` ...)
            or a dict with ``embed_dims``, ``num_layers``, ``num_heads``,
            ``feedforward_channels``.
        patch_size (int): patch size (14 or 16). Defaults to 16.
        checkpoint (str, optional): local weights: an mmpretrain backbone
            state dict, or a classifier checkpoint whose ``backbone.``
            entries are used (the prefix is stripped, the rest ignored).
            Loaded strictly (mmpretrain resizes ``pos_embed`` to
            ``img_size`` while loading). ``None`` keeps mmpretrain's own
            initialisation.
        **kwargs: more ``VisionTransformer`` arguments (``img_size``,
            ``layer_scale_init_value``, ``pre_norm``, ...). ``out_type`` and
            ``out_indices`` are managed by the wrapper.
    """

    _RESERVED = ('out_type', 'out_indices', 'init_cfg')

    def __init__(self,
                 arch: str | dict = 'b',
                 patch_size: int = 16,
                 checkpoint: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        from mmpretrain.models.backbones import VisionTransformer
        from mmpretrain.models.utils import resize_pos_embed
        reserved = [k for k in self._RESERVED if k in kwargs]
        if reserved:
            raise ValueError(f'base must not set {reserved} for an '
                             'mmpretrain base ViT: AdapterViT reads all '
                             'tokens and loads weights from base.checkpoint')
        self._resize_pos_embed = resize_pos_embed
        self.model = VisionTransformer(
            arch=arch,
            patch_size=patch_size,
            out_type='raw',
            out_indices=-1,
            **kwargs)
        self.embed_dim = self.model.embed_dims
        self.patch_size = _square_patch(
            self.model.patch_embed.projection.stride, 'mmpretrain base ViT')
        self.num_prefix_tokens = self.model.num_extra_tokens
        self.has_class_token = self.model.cls_token is not None
        if checkpoint is None:
            self.model.init_weights()
        else:
            self.load_checkpoint(checkpoint)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def norm(self) -> nn.Module:
        return self.model.ln1 if self.model.final_norm else _IDENTITY

    def load_checkpoint(self, filename: str) -> None:
        """Load ``filename`` strictly (``backbone.`` prefix stripped).

        Args:
            filename (str): local checkpoint path.
        """
        state_dict = select_part(read_state_dict(filename), 'backbone.')
        load_state_dict_checked(self.model, state_dict, filename,
                                'the mmpretrain VisionTransformer')

    def embed(self, x: Tensor) -> Tensor:
        m = self.model
        x, patch_resolution = m.patch_embed(x)
        if m.cls_token is not None:
            x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self._resize_pos_embed(
            m.pos_embed,
            m.patch_resolution,
            patch_resolution,
            mode=m.interpolate_mode,
            num_extra_tokens=m.num_extra_tokens)
        x = m.drop_after_pos(x)
        return m.pre_norm(x)


#: ``base.type`` values accepted by :func:`build_base_vit`.
BASE_VIT_TYPES: dict[str, type[BaseViT]] = {
    'timm': TimmBaseViT,
    'mmpretrain': MMPretrainBaseViT,
}


def build_base_vit(cfg: Mapping[str, Any]) -> BaseViT:
    """Build a base ViT from ``dict(type='timm' | 'mmpretrain', ...)``.

    Args:
        cfg (Mapping): ``type`` plus the arguments of :class:`TimmBaseViT`
            or :class:`MMPretrainBaseViT`.

    Returns:
        BaseViT: the wrapper, with weights loaded.
    """
    if not isinstance(cfg, Mapping) or 'type' not in cfg:
        raise ValueError("base must be a dict with type='timm' or "
                         f"type='mmpretrain', got {cfg!r}")
    cfg = dict(cfg)
    base_type = cfg.pop('type')
    if base_type not in BASE_VIT_TYPES:
        raise ValueError(f"base.type='{base_type}' is not supported; choose "
                         f'from {sorted(BASE_VIT_TYPES)}')
    base_cls = BASE_VIT_TYPES[base_type]
    try:
        inspect.signature(base_cls).bind(**cfg)
    except TypeError as err:  # unknown or missing option
        raise TypeError(f"base (type='{base_type}'): {err}") from None
    return base_cls(**cfg)


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
