"""Building blocks of the ViT-Adapter (Chen et al., ICLR 2023).

`Vision Transformer Adapter for Dense Predictions
<https://arxiv.org/abs/2205.08534>`_ adds to a plain ViT:

- a :class:`SpatialPriorModule`: a conv stem giving a feature pyramid
  ``c1..c4`` at strides 4/8/16/32, projected to the ViT width;
- per group of ViT blocks an :class:`InteractionBlock`:

  - :class:`Injector`: multi-scale deformable cross-attention whose queries
    are the ViT patch tokens and whose values are the spatial-prior tokens
    ``c2..c4``; its output is scaled by a per-channel ``gamma`` (zero at
    initialisation, so the ViT token stream is untouched at step 0);
  - the ViT blocks themselves (frozen in kiv);
  - :class:`Extractor`: deformable attention back from the ViT patch tokens
    into ``c2..c4``, followed by a :class:`ConvFFN` (depthwise conv FFN).

Queries and values are LayerNorm-ed before every interaction, so the large
token magnitudes of deep DINOv2 layers do not leak into the attention.

Attention is :class:`~kiv.models.layers.deform_attention.MSDeformAttn`
(mmcv's module with kiv's sampling core, :mod:`kiv.models.layers`). The
global token's attention pool folds its key projection into the learnable
query (:func:`~kiv.models.layers.attention_pool.latent_attention_pool`), so
the ~1.3k keys are never projected.

Memory layout: the spatial prior runs channels-last and its 1x1
projections are plain matrix products on the flattened pixels, so its maps
are views of token-ordered ``(B, h * w, C)`` memory; :func:`tokens_to_maps`
and :class:`ConvFFN` move between tokens and maps without copies where the
memory allows it.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_activation_layer
from mmcv.cnn.bricks import DropPath
from timm.layers import AttentionPoolLatent
from torch import Tensor

from kiv.registry import MODELS
from ..layers.attention_pool import latent_attention_pool
from ..layers.deform_attention import MSDeformAttn

__all__ = [
    'DeformInputs', 'make_deform_inputs', 'tokens_to_maps',
    'SpatialPriorModule', 'ConvFFN', 'Injector', 'Extractor',
    'InteractionBlock', 'GlobalToken'
]

#: Token LayerNorm used before every interaction (as in ViT-Adapter).
TokenNorm = partial(nn.LayerNorm, eps=1e-6)

#: ``(h, w)`` of every level of a flattened multi-level token sequence.
LevelShapes = Sequence[tuple[int, int]]


class DeformInputs(NamedTuple):
    """Geometry of one deformable cross-attention, computed once a forward.

    Attributes:
        reference_points (Tensor): ``(1, N_q, 1, 2)`` normalised ``(x, y)``
            centres of the query tokens in ``[0, 1]``; broadcast over the
            batch and the value levels.
        spatial_shapes (Tensor): ``(L, 2)`` long, ``(h, w)`` of each value
            level.
        level_start_index (Tensor): ``(L,)`` long, offset of each level in
            the flattened values.
    """
    reference_points: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor


def make_deform_inputs(query_shapes: LevelShapes, value_shapes: LevelShapes,
                       device: torch.device) -> DeformInputs:
    """Reference points of query grids and the layout of value levels.

    Args:
        query_shapes (Sequence[tuple[int, int]]): ``(h, w)`` of each query
            level, in the order of the flattened queries.
        value_shapes (Sequence[tuple[int, int]]): ``(h, w)`` of each value
            level, in the order of the flattened values.
        device (torch.device): where to put the tensors.

    Returns:
        DeformInputs: with ``reference_points (1, sum h*w of queries, 1, 2)``.
    """
    points = []
    for h, w in query_shapes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing='ij')
        points.append(torch.stack((ref_x.flatten(), ref_y.flatten()), -1))
    reference_points = torch.cat(points)[None, :, None]
    spatial_shapes = torch.as_tensor(
        value_shapes, dtype=torch.long, device=device)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))
    return DeformInputs(reference_points, spatial_shapes, level_start_index)


def tokens_to_maps(tokens: Tensor, shapes: LevelShapes) -> list[Tensor]:
    """Split a flattened multi-level sequence into NCHW maps.

    The maps are views of ``tokens`` (channels-last strides, no copy) when
    its channel dimension is contiguous.

    Args:
        tokens (Tensor): ``(B, sum h*w, C)``.
        shapes (Sequence[tuple[int, int]]): ``(h, w)`` of each level.

    Returns:
        list[Tensor]: one ``(B, C, h, w)`` map per level.
    """
    B, _, C = tokens.shape
    chunks = tokens.split([h * w for h, w in shapes], dim=1)
    return [
        t.unflatten(1, (h, w)).permute(0, 3, 1, 2)
        for t, (h, w) in zip(chunks, shapes)
    ]


def _maps_to_tokens(maps: Sequence[Tensor]) -> Tensor:
    """Inverse of :func:`tokens_to_maps`: ``(B, sum h*w, C)`` tokens
    (contiguous; one copy into the result, none if there is one map whose
    memory already is token-ordered)."""
    tokens = [m.permute(0, 2, 3, 1).flatten(1, 2) for m in maps]
    return tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=1)


def _deform_attn(embed_dim: int, num_heads: int, num_levels: int,
                 num_points: int, deform_ratio: float) -> MSDeformAttn:
    """The adapter's deformable attention (batch first, no dropout)."""
    return MSDeformAttn(
        embed_dims=embed_dim,
        num_heads=num_heads,
        num_levels=num_levels,
        num_points=num_points,
        dropout=0.0,
        batch_first=True,
        value_proj_ratio=deform_ratio)


# --------------------------------------------------------------------------
# spatial prior and conv FFN
def _pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 conv as a matrix product over channels-last pixels.

    Args:
        conv (nn.Conv2d): 1x1, stride 1, no groups.
        x (Tensor): ``(B, C_in, h, w)``.

    Returns:
        Tensor: ``(B, C_out, h, w)``, a view of contiguous ``(B, h, w,
        C_out)`` memory (channels last).
    """
    pixels = x.permute(0, 2, 3, 1)
    out = F.linear(pixels, conv.weight.flatten(1), conv.bias)
    return out.permute(0, 3, 1, 2)


@MODELS.register_module()
class SpatialPriorModule(nn.Module):
    """Conv stem giving the spatial prior ``c1..c4`` (strides 4/8/16/32).

    ResNet-like stem (three 3x3 convs, the first with stride 2, and a
    stride-2 max pool), three stride-2 3x3 convs, and 1x1 projections of all
    four levels to ``embed_dim``. Each stride-2 layer maps a side ``s`` to
    ``ceil(s / 2)``, so level ``l`` has side ``ceil(H / 2**(l+1))``.

    Runs channels-last (faster convolutions and norms on CPU); the 1x1
    projections are matrix products over the pixels, so each output map is
    a view of token-ordered ``(B, h * w, embed_dim)`` memory.

    Args:
        inplanes (int): stem width; levels have ``inplanes * (1, 2, 4, 4)``
            channels before projection. Defaults to 64.
        embed_dim (int): output width (the ViT width). Defaults to 768.
        in_channels (int): image channels. Defaults to 3.
        norm_cfg (dict): conv norm (mmcv ``build_norm_layer``). Defaults to
            ``dict(type='BN')``.
        act_cfg (dict): conv activation. Defaults to ``dict(type='ReLU')``.
    """

    def __init__(self,
                 inplanes: int = 64,
                 embed_dim: int = 768,
                 in_channels: int = 3,
                 norm_cfg: dict = dict(type='BN'),
                 act_cfg: dict = dict(type='ReLU')) -> None:
        super().__init__()
        conv = partial(ConvModule, kernel_size=3, padding=1,
                       norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.stem = nn.Sequential(
            conv(in_channels, inplanes, stride=2),
            conv(inplanes, inplanes),
            conv(inplanes, inplanes),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.conv2 = conv(inplanes, 2 * inplanes, stride=2)
        self.conv3 = conv(2 * inplanes, 4 * inplanes, stride=2)
        self.conv4 = conv(4 * inplanes, 4 * inplanes, stride=2)
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """
        Args:
            x (Tensor): images ``(B, 3, H, W)``.

        Returns:
            tuple[Tensor, ...]: ``c1..c4``, each ``(B, embed_dim, h_l, w_l)``
            with ``h_l = ceil(H / 2**(l+1))`` (strides 4, 8, 16, 32),
            channels-last memory.
        """
        c1 = self.stem(x.contiguous(memory_format=torch.channels_last))
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return tuple(
            _pointwise(fc, c)
            for fc, c in zip((self.fc1, self.fc2, self.fc3, self.fc4),
                             (c1, c2, c3, c4)))


@MODELS.register_module()
class ConvFFN(nn.Module):
    """FFN with a 3x3 depthwise conv on every level of the token pyramid.

    ``fc1 -> depthwise 3x3 conv (per level) -> act -> drop -> fc2 -> drop``.
    The depthwise conv runs channels-last on views of the tokens, so the
    token order is kept without transposes.

    Args:
        embed_dim (int): token width ``C``.
        hidden_dim (int): hidden width.
        act_cfg (dict): activation. Defaults to ``dict(type='GELU')``.
        drop (float): dropout. Defaults to 0.
    """

    def __init__(self,
                 embed_dim: int,
                 hidden_dim: int,
                 act_cfg: dict = dict(type='GELU'),
                 drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.dwconv = nn.Conv2d(
            hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = build_activation_layer(act_cfg)
        self.fc2 = nn.Linear(hidden_dim, embed_dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, level_shapes: LevelShapes) -> Tensor:
        """
        Args:
            x (Tensor): ``(B, N, C)``, levels of ``level_shapes`` flattened
                and concatenated (``N = sum h*w``).
            level_shapes (Sequence[tuple[int, int]]): ``(h, w)`` per level.

        Returns:
            Tensor: ``(B, N, C)``.
        """
        maps = tokens_to_maps(self.fc1(x), level_shapes)
        x = _maps_to_tokens([
            self.dwconv(m.contiguous(memory_format=torch.channels_last))
            for m in maps
        ])
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


# --------------------------------------------------------------------------
# interactions
@MODELS.register_module()
class Injector(nn.Module):
    """Injects the spatial prior into the ViT patch tokens.

    ``x + gamma * MSDeformAttn(LN(x), values=LN(c))``: queries are the patch
    tokens (reference points at their grid centres), values the flattened
    ``c2..c4``. ``gamma`` is per channel and starts at ``init_values``
    (0 keeps the ViT token stream exactly unchanged at initialisation).

    Args:
        embed_dim (int): token width ``C``.
        num_heads (int): attention heads. Defaults to 6.
        num_levels (int): value levels. Defaults to 3.
        num_points (int): sampling points per head and level. Defaults to 4.
        deform_ratio (float): value projection width ratio. Defaults to 1.
        init_values (float): initial ``gamma``. Defaults to 0.
    """

    def __init__(self,
                 embed_dim: int,
                 num_heads: int = 6,
                 num_levels: int = 3,
                 num_points: int = 4,
                 deform_ratio: float = 1.0,
                 init_values: float = 0.0) -> None:
        super().__init__()
        self.query_norm = TokenNorm(embed_dim)
        self.feat_norm = TokenNorm(embed_dim)
        self.attn = _deform_attn(embed_dim, num_heads, num_levels, num_points,
                                 deform_ratio)
        self.gamma = nn.Parameter(
            torch.full((embed_dim, ), float(init_values)))

    def forward(self, x: Tensor, feat: Tensor,
                deform_inputs: DeformInputs) -> Tensor:
        """
        Args:
            x (Tensor): ViT patch tokens ``(B, N_p, C)``.
            feat (Tensor): spatial-prior tokens ``(B, N_c, C)``.
            deform_inputs (DeformInputs): patch-grid reference points and the
                layout of ``feat``.

        Returns:
            Tensor: ``(B, N_p, C)``.
        """
        attn = self.attn.attend(self.query_norm(x), self.feat_norm(feat),
                                *deform_inputs)
        return x + self.gamma * attn


@MODELS.register_module()
class Extractor(nn.Module):
    """Extracts the ViT patch tokens back into the spatial-prior tokens.

    ``c = c + MSDeformAttn(LN(c), values=LN(x))`` (queries: ``c2..c4`` at
    their grid centres; values: the ViT patch grid, one level), then
    ``c = c + DropPath(ConvFFN(LN(c)))``.

    Args:
        embed_dim (int): token width ``C``.
        num_heads (int): attention heads. Defaults to 6.
        num_points (int): sampling points per head. Defaults to 4.
        deform_ratio (float): value projection width ratio. Defaults to 1.
        with_cffn (bool): add the ConvFFN. Defaults to True.
        cffn_ratio (float): ConvFFN hidden width ratio. Defaults to 0.25.
        drop_path (float): stochastic depth of the ConvFFN branch.
            Defaults to 0.
    """

    def __init__(self,
                 embed_dim: int,
                 num_heads: int = 6,
                 num_points: int = 4,
                 deform_ratio: float = 1.0,
                 with_cffn: bool = True,
                 cffn_ratio: float = 0.25,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.query_norm = TokenNorm(embed_dim)
        self.feat_norm = TokenNorm(embed_dim)
        self.attn = _deform_attn(embed_dim, num_heads, 1, num_points,
                                 deform_ratio)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn_norm = TokenNorm(embed_dim)
            self.ffn = ConvFFN(embed_dim, int(embed_dim * cffn_ratio))
            self.drop_path = DropPath(drop_path) if drop_path > 0 \
                else nn.Identity()

    def forward(self, c: Tensor, feat: Tensor, deform_inputs: DeformInputs,
                level_shapes: LevelShapes) -> Tensor:
        """
        Args:
            c (Tensor): spatial-prior tokens ``(B, N_c, C)``.
            feat (Tensor): ViT patch tokens ``(B, N_p, C)``.
            deform_inputs (DeformInputs): reference points of ``c`` and the
                patch-grid layout.
            level_shapes (Sequence[tuple[int, int]]): ``(h, w)`` of the
                levels of ``c``.

        Returns:
            Tensor: ``(B, N_c, C)``.
        """
        c = c + self.attn.attend(self.query_norm(c), self.feat_norm(feat),
                                 *deform_inputs)
        if self.with_cffn:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), level_shapes))
        return c


@MODELS.register_module()
class InteractionBlock(nn.Module):
    """Injector -> a group of (frozen) ViT blocks -> extractor(s).

    Args:
        embed_dim (int): token width ``C``.
        num_heads (int): deformable attention heads. Defaults to 6.
        num_points (int): sampling points. Defaults to 4.
        deform_ratio (float): value projection ratio. Defaults to 1.
        with_cffn (bool): ConvFFN in the extractors. Defaults to True.
        cffn_ratio (float): ConvFFN hidden ratio. Defaults to 0.25.
        init_values (float): initial injector ``gamma``. Defaults to 0.
        drop_path (float): extractor ConvFFN stochastic depth. Defaults to 0.
        extra_extractor (bool): two more extractors after the first (the
            last block of ViT-Adapter). Defaults to False.
    """

    def __init__(self,
                 embed_dim: int,
                 num_heads: int = 6,
                 num_points: int = 4,
                 deform_ratio: float = 1.0,
                 with_cffn: bool = True,
                 cffn_ratio: float = 0.25,
                 init_values: float = 0.0,
                 drop_path: float = 0.0,
                 extra_extractor: bool = False) -> None:
        super().__init__()
        self.injector = Injector(
            embed_dim,
            num_heads=num_heads,
            num_levels=3,
            num_points=num_points,
            deform_ratio=deform_ratio,
            init_values=init_values)
        extractor = partial(
            Extractor,
            embed_dim,
            num_heads=num_heads,
            num_points=num_points,
            deform_ratio=deform_ratio,
            with_cffn=with_cffn,
            cffn_ratio=cffn_ratio,
            drop_path=drop_path)
        self.extractor = extractor()
        self.extra_extractors = nn.ModuleList(
            [extractor() for _ in range(2)] if extra_extractor else [])

    def forward(self, x: Tensor, c: Tensor, blocks: Sequence[nn.Module],
                num_prefix_tokens: int, injector_inputs: DeformInputs,
                extractor_inputs: DeformInputs,
                level_shapes: LevelShapes) -> tuple[Tensor, Tensor]:
        """
        Args:
            x (Tensor): ViT tokens ``(B, P + N_p, C)``, ``P`` prefix tokens
                (CLS, registers) first; only patch tokens take part in the
                interaction, prefix tokens only run through the blocks.
            c (Tensor): spatial-prior tokens ``(B, N_c, C)``.
            blocks (Sequence[nn.Module]): the ViT blocks of this group.
            num_prefix_tokens (int): ``P``.
            injector_inputs (DeformInputs): patch grid -> ``c`` levels.
            extractor_inputs (DeformInputs): ``c`` levels -> patch grid.
            level_shapes (Sequence[tuple[int, int]]): ``c2..c4`` shapes.

        Returns:
            tuple[Tensor, Tensor]: updated ``x`` and ``c``.
        """
        patch = self.injector(x[:, num_prefix_tokens:], c, injector_inputs)
        x = torch.cat((x[:, :num_prefix_tokens], patch), dim=1) \
            if num_prefix_tokens else patch
        for block in blocks:
            x = block(x)
        patch = x[:, num_prefix_tokens:]
        c = self.extractor(c, patch, extractor_inputs, level_shapes)
        for extractor in self.extra_extractors:
            c = extractor(c, patch, extractor_inputs, level_shapes)
        return x, c


# --------------------------------------------------------------------------
# global token
@MODELS.register_module()
class GlobalToken(nn.Module):
    """A learnable global token that reads the adapter (the summary vector).

    A learnable latent query (timm's
    :class:`~timm.layers.AttentionPoolLatent`: query token, attention, MLP)
    attends over the final base tokens and the LayerNorm-ed adapter tokens;
    its output is added, scaled by a per-channel ``gamma`` (zero at
    initialisation), to the base summary (the base CLS token):

    ``summary = base_summary + gamma * Pool([base_tokens, LN(c)])``.

    The token is not appended to the ViT token stream: that would change what
    the frozen base computes for every other token. The pool runs through
    :func:`latent_attention_pool` (keys folded into the latent query, so the
    ~1.3k tokens are never projected).

    Args:
        embed_dim (int): width ``C``.
        num_heads (int): attention heads. Defaults to 8.
        mlp_ratio (float): MLP ratio of the pool. Defaults to 4.
        init_values (float): initial ``gamma``. Defaults to 0.
    """

    def __init__(self,
                 embed_dim: int,
                 num_heads: int = 8,
                 mlp_ratio: float = 4.0,
                 init_values: float = 0.0) -> None:
        super().__init__()
        self.feat_norm = TokenNorm(embed_dim)
        self.pool = AttentionPoolLatent(
            embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            norm_layer=TokenNorm)
        self.gamma = nn.Parameter(
            torch.full((embed_dim, ), float(init_values)))

    def forward(self, base_summary: Tensor, base_tokens: Tensor,
                adapter_tokens: Tensor) -> Tensor:
        """
        Args:
            base_summary (Tensor): ``(B, C)`` base CLS token (after norm).
            base_tokens (Tensor): ``(B, N, C)`` final base tokens (after
                norm).
            adapter_tokens (Tensor): ``(B, N_c, C)`` adapter tokens.

        Returns:
            Tensor: ``(B, C)`` summary.
        """
        pooled = latent_attention_pool(
            self.pool, (base_tokens, self.feat_norm(adapter_tokens)))
        return base_summary + self.gamma * pooled
