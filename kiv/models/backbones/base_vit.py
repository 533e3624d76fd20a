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
from abc import ABCMeta, abstractmethod
from typing import Any, Mapping, Sequence

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import Tensor

from kiv.registry import MODELS
from kiv.utils.state_dict import (load_state_dict_checked, read_state_dict,
                                  select_part)
from kiv.utils.timm_weights import load_timm_checkpoint

__all__ = ['BaseViT', 'TimmBaseViT', 'MMPretrainBaseViT', 'build_base_vit']

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
