"""MaskCLIP's dense text-space output of a CLIP image tower.

CLIP's patch tokens are not in the text space; MaskCLIP (Zhou et al., ECCV
2022) gets per-patch embeddings that are: the last block's value path
(pre-attention norm -> value projection -> output projection, skipping the
query-key attention, the residual and the MLP), then the tower's final norm
(``ln_post``) and image projection, applied to every token. A
:class:`ValuePathRecorder` records the last block's input with a forward
pre-hook and computes those tokens from the model's own modules; the
teacher returns them as one more dense level (``features=dict(...,
text_space=dict(block=..., norm=..., proj=...))``).

Attention modules understood: timm's ``Attention`` (fused ``qkv`` and
``proj``), Hugging Face's ``CLIPAttention`` (``v_proj``, ``out_proj``) and
``nn.MultiheadAttention`` (open_clip; batch-first blocks).
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['ValuePathRecorder', 'value_path']

#: (pre-attention norm, attention) attribute names of supported blocks
_BLOCK_ATTRS = (('norm1', 'attn'), ('layer_norm1', 'self_attn'),
                ('ln_1', 'attn'))


def _block_parts(block: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    """The pre-attention norm and the attention module of a ViT block."""
    for norm, attn in _BLOCK_ATTRS:
        if hasattr(block, norm) and hasattr(block, attn):
            parts = getattr(block, norm), getattr(block, attn)
            if isinstance(parts[1], nn.MultiheadAttention) or any(
                    hasattr(parts[1], a) for a in ('qkv', 'v_proj')):
                return parts
    raise ValueError(
        f'Teacher text_space block {name!r} ({type(block).__name__}) is not '
        'a ViT block kiv knows: expected norm1+attn.qkv/proj (timm), '
        'layer_norm1+self_attn.v_proj/out_proj (Hugging Face) or '
        'ln_1+attn (nn.MultiheadAttention, open_clip)')


def value_path(block: nn.Module, tokens: Tensor, name: str = 'block'
               ) -> Tensor:
    """The value path of a block: norm -> value -> output projection.

    Args:
        block (nn.Module): a supported ViT block (module doc).
        tokens (Tensor): the block's input ``(B, N, C)``.
        name (str): the block's name, for errors.

    Returns:
        Tensor: ``(B, N, C)``.
    """
    norm, attn = _block_parts(block, name)
    x = norm(tokens)
    if isinstance(attn, nn.MultiheadAttention):
        dim = attn.embed_dim
        bias = attn.in_proj_bias
        v = F.linear(x, attn.in_proj_weight[2 * dim:],
                     None if bias is None else bias[2 * dim:])
        return attn.out_proj(v)
    if hasattr(attn, 'v_proj'):
        return attn.out_proj(attn.v_proj(x))
    dim = attn.qkv.out_features // 3
    bias = attn.qkv.bias
    v = F.linear(x, attn.qkv.weight[2 * dim:],
                 None if bias is None else bias[2 * dim:])
    return attn.proj(getattr(attn, 'norm', nn.Identity())(v))


class ValuePathRecorder:
    """Record a block's input and give MaskCLIP's text-space tokens.

    The hook is a bound method (through :func:`functools.partial`), as in
    :class:`~kiv.models.teachers.recorder.ModuleOutputsRecorder`, so a
    deep copy of the model records into the copied recorder.

    Args:
        model (nn.Module): the CLIP image tower.
        cfg (dict): ``block`` (the last ViT block, e.g. ``'blocks.11'``,
            or the sequence of blocks, e.g. ``'blocks'``: its last one,
            whatever the depth), ``norm`` (the final norm, e.g.
            ``'norm'``) and ``proj`` (the image projection, e.g.
            ``'head'``): names from ``model.named_modules()``.

    Raises:
        ValueError: unknown keys or names, or an unsupported block.
    """

    def __init__(self, model: nn.Module, cfg: Mapping) -> None:
        keys = ('block', 'norm', 'proj')
        if not isinstance(cfg, Mapping) or set(cfg) != set(keys):
            raise ValueError(f'Teacher features.text_space must be dict('
                             f'block=..., norm=..., proj=...), got {cfg!r}')
        modules = dict(model.named_modules())
        missing = [cfg[k] for k in keys if cfg[k] not in modules]
        if missing:
            raise ValueError(f'Teacher features.text_space: '
                             f'{type(model).__name__} has no submodule '
                             f'{missing[0]!r}')
        self.name = cfg['block']
        self.block, self.norm, self.proj = (modules[cfg[k]] for k in keys)
        if isinstance(self.block, (nn.ModuleList, nn.Sequential)):
            self.name = f'{self.name}.{len(self.block) - 1}'
            self.block = self.block[-1]
        _block_parts(self.block, self.name)
        self.input: Tensor | None = None
        self._handle = self.block.register_forward_pre_hook(
            partial(self._store))

    def _store(self, module: nn.Module, args: tuple) -> None:
        self.input = args[0]

    def tokens(self) -> Tensor:
        """The text-space tokens of the last forward pass.

        Returns:
            Tensor: ``(B, N, D)``, ``D`` the projection's output width.

        Raises:
            RuntimeError: the block did not run since :meth:`clear`.
        """
        if self.input is None:
            raise RuntimeError(f'text_space block {self.name!r} did not run '
                               'in the teacher forward')
        return self.proj(self.norm(value_path(self.block, self.input,
                                              self.name)))

    def clear(self) -> None:
        """Drop the recorded input."""
        self.input = None

    def remove(self) -> None:
        """Remove the hook."""
        self._handle.remove()
