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

Attention is :class:`MSDeformAttn`: mmcv's
:class:`~mmcv.ops.MultiScaleDeformableAttention` (same parameters, same
initialisation, same state dict) with

- its CUDA kernel on GPU (mmcv built with CUDA ops), always fed float32: the
  kernel dispatches float and half only, so under bf16 autocast it would
  fail; like ViT-Adapter's ``custom_fwd(cast_inputs=torch.float32)``, the
  sampling core runs in float32 with autocast off, the projections around
  it in the autocast dtype;
- everywhere else kiv's own sampling (:func:`deform_sampling_points_major`;
  :func:`ms_deform_attn_sampling` in mmcv's layout): offsets, softmax and
  locations are computed points-major, and one ``embedding_bag`` gathers
  and weighs the four bilinear corners of every sampling point of every
  level, head and query in a single pass (no per-level ``grid_sample``, no
  ``(B * heads, C, queries, points)`` intermediate), with an analytic
  backward. It matches mmcv's pure-PyTorch path
  ``multi_scale_deformable_attn_pytorch`` to float rounding, gradients
  included.

The global token's attention pool folds its key projection into the
learnable query (:func:`latent_attention_pool`), so the ~1.3k keys are
never projected.

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
from mmcv.ops import MultiScaleDeformableAttention
from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction
from mmcv.utils import IS_CUDA_AVAILABLE, IS_MLU_AVAILABLE
from timm.layers import AttentionPoolLatent
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from kiv.registry import MODELS

__all__ = [
    'DeformInputs', 'make_deform_inputs', 'tokens_to_maps',
    'ms_deform_attn', 'ms_deform_attn_sampling',
    'deform_sampling_points_major', 'latent_attention_pool', 'MSDeformAttn',
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


# --------------------------------------------------------------------------
# multi-scale deformable attention
class _DeformSampling(torch.autograd.Function):
    """Bilinear multi-scale deformable sampling as one weighted gather.

    Works on *points-major* tensors: sampling locations ``(2, L, P, heads,
    B, N_q)`` and attention weights ``(L, P, heads, B, N_q)``, so every
    elementwise step runs over long contiguous ``B * N_q`` rows and the
    per-level constants broadcast as scalars.

    Each ``(head, batch, query)`` output row is the sum over levels, points
    and the four bilinear corners of ``weight * value row``: one
    ``embedding_bag`` over the value table ``(heads * B * N_v, C_h)`` with
    ``K = 4 * L * P`` entries per bag. Corners outside a level get weight 0
    (``grid_sample``'s ``padding_mode='zeros'``, ``align_corners=False``);
    non-finite locations give NaN outputs (never an out-of-range row).

    Backward: the value gradient is the transposed gather (entries sorted
    by value row, then one ``embedding_bag`` over the output gradient); the
    gradient of the corner weights is ``<grad_out row, value row>`` (the
    ``per_sample_weights`` gradient of ``embedding_bag``), chained
    analytically to the attention weights and the sampling locations.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, value: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, locations: Tensor,
                weights: Tensor) -> Tensor:
        B, num_values, heads, channels = value.shape
        levels, points, _, _, num_queries = weights.shape
        dtype = weights.dtype
        # per level (x, y) sizes, (2, L, 1, 1, 1, 1)
        size = spatial_shapes.t().flip(0).to(dtype).view(
            2, levels, 1, 1, 1, 1)
        # pixel coordinates of grid_sample (align_corners=False) and the
        # two corners around them, x and y at once: (2, L, P, heads, B, Q)
        pixel = torch.addcmul(locations.new_tensor(-0.5), locations, size)
        corner0 = pixel.floor()
        frac = pixel - corner0
        corner1 = corner0 + 1
        zero = pixel.new_zeros(())
        index0 = torch.clamp(corner0, zero, size - 1)
        index1 = torch.clamp(corner1, zero, size - 1)
        # a corner is inside its level iff clamping left it unchanged
        valid0 = (index0 == corner0).to(dtype)
        valid1 = (index1 == corner1).to(dtype)
        # bilinear factors (zero outside): w0 = 1 - frac, w1 = frac
        w0 = (1 - frac) * valid0
        w1 = frac * valid1
        ay0, ay1 = weights * w0[1], weights * w1[1]

        # corner weights and value-table rows, (4 [y0x0, y0x1, y1x0, y1x1],
        # L, P, heads, B, N_q). The table is (heads, B, N_v, C_h) and the
        # bags are (head, b, q): the rows one slab (head, b) reads stay in
        # cache, in the gathers of the forward and of the backward.
        corner_weights = pixel.new_empty((4, ) + weights.shape)
        torch.mul(ay0, w0[0], out=corner_weights[0])
        torch.mul(ay0, w1[0], out=corner_weights[1])
        torch.mul(ay1, w0[0], out=corner_weights[2])
        torch.mul(ay1, w1[0], out=corner_weights[3])
        starts = level_start_index.to(dtype).view(levels, 1, 1, 1, 1)
        row0 = torch.addcmul(starts, index0[1], size[0])
        row1 = torch.addcmul(starts, index1[1], size[0])
        # positions < N_v: exact in float32 up to 2**24 values per image
        positions = pixel.new_empty((4, ) + weights.shape)
        torch.add(row0, index0[0], out=positions[0])
        torch.add(row0, index1[0], out=positions[1])
        torch.add(row1, index0[0], out=positions[2])
        torch.add(row1, index1[0], out=positions[3])
        slab = torch.arange(heads * B, device=value.device).view(
            heads, B, 1) * num_values
        # non-finite locations (a diverged run): any valid row, NaN weight
        rows = positions.nan_to_num_(0.0).long() + slab
        bag_shape = (-1, heads * B * num_queries)
        index = rows.view(bag_shape).t().contiguous()
        corner_weights = corner_weights.view(bag_shape).t().contiguous()

        table = value.permute(2, 0, 1, 3).reshape(-1, channels)
        out = F.embedding_bag(index, table, per_sample_weights=corner_weights,
                              mode='sum')
        ctx.save_for_backward(table, index, corner_weights, weights, w0, w1,
                              valid0, valid1, ay0, ay1, size)
        ctx.value_shape = value.shape
        return out.view(heads, B, num_queries, channels).permute(
            1, 2, 0, 3).reshape(B, num_queries, heads * channels)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple:
        (table, index, corner_weights, weights, w0, w1, valid0, valid1, ay0,
         ay1, size) = ctx.saved_tensors
        need_value, _, _, need_loc, need_weights = ctx.needs_input_grad
        B, num_values, heads, channels = ctx.value_shape
        num_queries = grad_out.shape[1]
        # (head, b, q) rows, as the bags
        grad_rows = grad_out.reshape(B, num_queries, heads, channels).permute(
            2, 0, 1, 3).reshape(-1, channels)
        grad_value = grad_loc = grad_weights = None

        if need_value:
            # transposed gather: every table row sums weight * grad of the
            # output rows (bags) that read it; int32 keys sort faster
            flat = index.flatten()
            order = torch.argsort(
                flat.int() if table.shape[0] < 2**31 else flat)
            counts = torch.bincount(flat, minlength=table.shape[0])
            bags = torch.div(order, index.shape[1], rounding_mode='floor')
            grad_value = F.embedding_bag(
                bags, grad_rows, counts.cumsum(0) - counts,
                per_sample_weights=corner_weights.flatten().index_select(
                    0, order),
                mode='sum').view(heads, B, num_values, channels).permute(
                    1, 2, 0, 3).contiguous()

        if need_loc or need_weights:
            with torch.enable_grad():
                w = corner_weights.detach().requires_grad_()
                out = F.embedding_bag(index, table.detach(),
                                      per_sample_weights=w, mode='sum')
                grad_w, = torch.autograd.grad(out, w, grad_rows)
            g00, g01, g10, g11 = grad_w.t().reshape(
                (4, ) + weights.shape).unbind(0)
            wx0, wx1 = w0[0], w1[0]
            # d loss / d (a * wy_j) = sum_i g_ji * wx_i
            gy0 = torch.addcmul(g00 * wx0, g01, wx1)
            gy1 = torch.addcmul(g10 * wx0, g11, wx1)
            if need_weights:
                grad_weights = torch.addcmul(gy0 * w0[1], gy1, w1[1])
            if need_loc:
                # w0 = (1 - frac) * valid0, w1 = frac * valid1, and
                # frac = location * size + const
                gx1 = torch.addcmul(g01 * ay0, g11, ay1)
                gx0 = torch.addcmul(g00 * ay0, g10, ay1)
                grad_x = gx1 * valid1[0] - gx0 * valid0[0]
                grad_y = (gy1 * valid1[1] - gy0 * valid0[1]) * weights
                grad_loc = torch.stack((grad_x, grad_y)) * size
        return grad_value, None, None, grad_loc, grad_weights


def deform_sampling_points_major(value: Tensor, spatial_shapes: Tensor,
                                 level_start_index: Tensor, locations: Tensor,
                                 weights: Tensor) -> Tensor:
    """kiv's multi-scale deformable sampling on points-major inputs.

    The CPU core of :class:`MSDeformAttn` (any device, differentiable; see
    :func:`ms_deform_attn_sampling` for mmcv's layout).

    Args:
        value (Tensor): ``(B, N_v, heads, C_h)``, levels flattened in
            ``spatial_shapes`` order.
        spatial_shapes (Tensor): ``(L, 2)`` long, ``(h, w)`` per level.
        level_start_index (Tensor): ``(L,)`` long, first value of each
            level.
        locations (Tensor): ``(2, L, P, heads, B, N_q)`` normalised ``(x,
            y)`` sampling locations in ``[0, 1]`` (outside: zero padding).
        weights (Tensor): ``(L, P, heads, B, N_q)`` attention weights.

    Returns:
        Tensor: ``(B, N_q, heads * C_h)``.
    """
    return _DeformSampling.apply(value.contiguous(), spatial_shapes,
                                 level_start_index, locations.contiguous(),
                                 weights.contiguous())


def ms_deform_attn_sampling(value: Tensor, spatial_shapes: Tensor,
                            level_start_index: Tensor,
                            sampling_locations: Tensor,
                            attention_weights: Tensor) -> Tensor:
    """kiv's multi-scale deformable sampling in mmcv's layout.

    Same contract and result (to float rounding, gradients included) as
    mmcv's ``multi_scale_deformable_attn_pytorch`` and its CUDA kernel:
    bilinear sampling with ``align_corners=False`` and zero padding,
    weighted by the attention weights and summed over levels and points.

    Args:
        value (Tensor): ``(B, N_v, heads, C_h)``.
        spatial_shapes (Tensor): ``(L, 2)`` long, ``(h, w)`` per level.
        level_start_index (Tensor): ``(L,)`` long.
        sampling_locations (Tensor): ``(B, N_q, heads, L, P, 2)`` normalised
            ``(x, y)``.
        attention_weights (Tensor): ``(B, N_q, heads, L, P)``.

    Returns:
        Tensor: ``(B, N_q, heads * C_h)``.
    """
    return deform_sampling_points_major(
        value, spatial_shapes, level_start_index,
        sampling_locations.permute(5, 3, 4, 2, 0, 1),
        attention_weights.permute(3, 4, 2, 0, 1))


def _has_mmcv_kernel(value: Tensor) -> bool:
    """Whether mmcv's compiled ``ms_deform_attn`` serves ``value``'s device.
    """
    return (IS_CUDA_AVAILABLE and value.is_cuda) or \
        (IS_MLU_AVAILABLE and getattr(value, 'is_mlu', False))


def _at_least_fp32(x: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def ms_deform_attn(value: Tensor,
                   spatial_shapes: Tensor,
                   level_start_index: Tensor,
                   sampling_locations: Tensor,
                   attention_weights: Tensor,
                   im2col_step: int = 64,
                   points_major: bool = False) -> Tensor:
    """The sampling core of :class:`MSDeformAttn`, never below float32.

    Half and bfloat16 inputs are cast to float32 and autocast is disabled
    inside (float64 stays float64, e.g. for gradient checks): mmcv 2.1's
    CUDA ``ms_deform_attn`` dispatches float and half only, and ViT-Adapter
    runs it with ``custom_fwd(cast_inputs=torch.float32)``. Runs mmcv's CUDA
    (or MLU) kernel when mmcv has it and the tensors are on that device,
    kiv's sampling otherwise.

    Args:
        value (Tensor): ``(B, N_v, heads, C_h)``.
        spatial_shapes (Tensor): ``(L, 2)`` long.
        level_start_index (Tensor): ``(L,)`` long.
        sampling_locations (Tensor): ``(B, N_q, heads, L, P, 2)`` (mmcv's
            layout), or ``(2, L, P, heads, B, N_q)`` with ``points_major``.
        attention_weights (Tensor): ``(B, N_q, heads, L, P)``, or ``(L, P,
            heads, B, N_q)`` with ``points_major``.
        im2col_step (int): mmcv kernel's batch chunk. Defaults to 64.
        points_major (bool): the inputs are in kiv's points-major layout
            (:func:`deform_sampling_points_major`; not for mmcv's kernel).
            Defaults to False.

    Returns:
        Tensor: ``(B, N_q, heads * C_h)``, float32 (float64 for float64
        inputs).
    """
    with torch.autocast(device_type=value.device.type, enabled=False):
        value = _at_least_fp32(value)
        sampling_locations = _at_least_fp32(sampling_locations)
        attention_weights = _at_least_fp32(attention_weights)
        if points_major:
            return deform_sampling_points_major(
                value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights)
        if _has_mmcv_kernel(value):
            return MultiScaleDeformableAttnFunction.apply(
                value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, im2col_step)
        return ms_deform_attn_sampling(value, spatial_shapes,
                                       level_start_index, sampling_locations,
                                       attention_weights)


@MODELS.register_module()
class MSDeformAttn(MultiScaleDeformableAttention):
    """mmcv's multi-scale deformable attention with kiv's sampling core.

    A subclass of :class:`~mmcv.ops.MultiScaleDeformableAttention`: same
    arguments, parameters (``sampling_offsets``, ``attention_weights``,
    ``value_proj``, ``output_proj``), initialisation and state dict, and
    :meth:`forward` has mmcv's semantics. What differs is how it computes:

    - the sampling core is :func:`ms_deform_attn`: float32 under autocast;
      mmcv's CUDA kernel on GPU; elsewhere kiv's sampling on points-major
      tensors (offsets, softmax and locations computed in that layout too)
      instead of mmcv's per-level ``grid_sample`` path;
    - sampling offsets and attention logits come from one matrix product;
    - no host-device synchronisation (mmcv asserts the value count against
      ``spatial_shapes`` on every call; here only CPU tensors are checked).

    Args:
        *args: :class:`~mmcv.ops.MultiScaleDeformableAttention` arguments.
        **kwargs: :class:`~mmcv.ops.MultiScaleDeformableAttention`
            keyword arguments.
    """

    def forward(self,
                query: Tensor,
                key: Tensor | None = None,
                value: Tensor | None = None,
                identity: Tensor | None = None,
                query_pos: Tensor | None = None,
                key_padding_mask: Tensor | None = None,
                reference_points: Tensor | None = None,
                spatial_shapes: Tensor | None = None,
                level_start_index: Tensor | None = None,
                **kwargs) -> Tensor:
        """mmcv's forward: ``identity + dropout(attention)``.

        Args:
            query (Tensor): ``(B, N_q, C)`` (``(N_q, B, C)`` without
                ``batch_first``).
            key (Tensor, optional): unused (as in mmcv).
            value (Tensor, optional): ``(B, N_v, C)``; defaults to
                ``query``.
            identity (Tensor, optional): added to the output; defaults to
                ``query``.
            query_pos (Tensor, optional): added to ``query``.
            key_padding_mask (Tensor, optional): ``(B, N_v)`` bool, masked
                values are zeroed.
            reference_points (Tensor): ``(B, N_q, L, 2)`` normalised points
                or ``(B, N_q, L, 4)`` boxes (broadcastable).
            spatial_shapes (Tensor): ``(L, 2)`` long.
            level_start_index (Tensor): ``(L,)`` long.
            **kwargs: ignored (as in mmcv).

        Returns:
            Tensor: same layout as ``query``.
        """
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        output = self.attend(query, value, reference_points, spatial_shapes,
                             level_start_index, key_padding_mask)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity

    def attend(self,
               query: Tensor,
               value: Tensor,
               reference_points: Tensor,
               spatial_shapes: Tensor,
               level_start_index: Tensor,
               key_padding_mask: Tensor | None = None) -> Tensor:
        """The attention alone (no dropout, no identity), batch first.

        Args:
            query (Tensor): ``(B, N_q, C)``.
            value (Tensor): ``(B, N_v, C)``.
            reference_points (Tensor): ``(B | 1, N_q, L | 1, 2 | 4)``.
            spatial_shapes (Tensor): ``(L, 2)`` long.
            level_start_index (Tensor): ``(L,)`` long.
            key_padding_mask (Tensor, optional): ``(B, N_v)`` bool.

        Returns:
            Tensor: ``(B, N_q, C)``.
        """
        B, num_queries, _ = query.shape
        num_values = value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, \
            self.num_points
        if not spatial_shapes.is_cuda and \
                int(spatial_shapes.prod(1).sum()) != num_values:
            raise ValueError(
                f'MSDeformAttn: {num_values} values but spatial_shapes '
                f'{spatial_shapes.tolist()} hold '
                f'{int(spatial_shapes.prod(1).sum())}')
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError('MSDeformAttn: the last dim of reference_points '
                             f'must be 2 or 4, got {reference_points.shape}')
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(B, num_values, heads, -1)

        num_offsets = heads * levels * points * 2
        projected = F.linear(
            query,
            torch.cat((self.sampling_offsets.weight,
                       self.attention_weights.weight)),
            torch.cat((self.sampling_offsets.bias,
                       self.attention_weights.bias)))
        offsets = projected[..., :num_offsets].unflatten(
            -1, (heads, levels, points, 2))
        logits = projected[..., num_offsets:].unflatten(
            -1, (heads, levels * points))
        kernel = _has_mmcv_kernel(value)
        if kernel:  # mmcv's layout (B, N_q, heads, L, P[, 2])
            weights = logits.softmax(-1).unflatten(-1, (levels, points))
            ref = reference_points[:, :, None, :, None, :]
            normalizer = spatial_shapes.flip(-1)[None, None, None, :, None]
        else:  # points-major (2, L, P, heads, B, N_q)
            offsets = offsets.permute(5, 3, 4, 2, 0, 1).contiguous()
            weights = logits.permute(3, 2, 0, 1).reshape(
                levels * points, heads, B, num_queries).softmax(0).view(
                    levels, points, heads, B, num_queries)
            ref = reference_points.permute(3, 2, 0, 1)[:, :, None, None]
            normalizer = spatial_shapes.t().flip(0).view(2, levels, 1, 1, 1,
                                                         1)
        if reference_points.shape[-1] == 2:
            locations = ref + offsets / normalizer.to(offsets.dtype)
        else:  # boxes: centre + offset / points * size / 2
            centre, size = (ref[..., :2], ref[..., 2:]) if kernel else \
                (ref[:2], ref[2:])
            locations = centre + offsets / points * size * 0.5
        output = ms_deform_attn(value, spatial_shapes, level_start_index,
                                locations, weights, self.im2col_step,
                                points_major=not kernel)
        return self.output_proj(output.to(value.dtype))


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
def _folds_keys(pool: AttentionPoolLatent) -> bool:
    """Whether :func:`latent_attention_pool` may fold ``pool``'s key
    projection into its (input-independent) latent queries."""
    return (pool.pos_embed is None and isinstance(pool.q_norm, nn.Identity)
            and isinstance(pool.k_norm, nn.Identity))


def latent_attention_pool(pool: AttentionPoolLatent,
                          parts: Sequence[Tensor]) -> Tensor:
    """``pool(torch.cat(parts, dim=1))`` without projecting every key.

    timm's :class:`~timm.layers.AttentionPoolLatent` projects all ``N``
    tokens to keys and values (``N x C x 2C`` multiply-adds) for a handful
    of learnable queries. Both projections are linear, so with ``q`` the
    latent queries (which do not depend on the input)

    - ``q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x + const``: each head
      scores the tokens against one folded ``C``-vector;
    - ``sum_n a_n (W_v,h x_n + b_v,h) = W_v,h (sum_n a_n x_n) + b_v,h``
      (attention weights sum to 1): the tokens are pooled first and
      projected once.

    That is ``O(N x C x heads)`` instead of ``O(N x C^2)``, to float
    rounding the same result and gradients. The parts are scored separately
    (no concatenated copy of the keys). Pools with a position embedding or
    query/key norms fall back to the module's own forward.

    Args:
        pool (AttentionPoolLatent): the pooling module (its parameters are
            used as they are).
        parts (Sequence[Tensor]): key/value tokens ``(B, N_i, C)``, pooled
            as if concatenated along the tokens.

    Returns:
        Tensor: what ``pool(torch.cat(parts, 1))`` returns.
    """
    if not _folds_keys(pool):
        return pool(torch.cat(list(parts), dim=1))
    B, _, C = parts[0].shape
    heads, head_dim, num_latents = pool.num_heads, pool.head_dim, \
        pool.latent_len
    # the latent queries (latents, C); nn.Linear applied functionally: a
    # module call on a view of a parameter made under no_grad trips
    # torch's module tracker (FlopCounterMode)
    latent = pool.latent[0]
    if isinstance(pool.q, nn.Linear):
        q = F.linear(latent, pool.q.weight, pool.q.bias)
    else:
        q = pool.q(latent)
    q = q.view(num_latents, heads, head_dim).transpose(0, 1)  # (h, l, d)
    w_k, w_v = pool.kv.weight.view(2, heads, head_dim, C).unbind(0)
    # folded keys: (heads * latents, C); scale as scaled_dot_product_attention
    folded = torch.matmul(q, w_k).flatten(0, 1) * pool.scale
    scores = torch.cat([torch.matmul(p, folded.t()) for p in parts], dim=1)
    if pool.kv.bias is not None:
        b_k, b_v = pool.kv.bias.view(2, heads, head_dim).unbind(0)
        scores = scores + (q * b_k[:, None]).sum(-1).flatten() * pool.scale
    attn = scores.softmax(dim=1)  # (B, N, heads * latents)
    pooled = sum(
        torch.bmm(a.transpose(1, 2), p)
        for a, p in zip(attn.split([p.shape[1] for p in parts], dim=1),
                        parts))  # (B, heads * latents, C)
    pooled = pooled.view(B, heads, num_latents, C)
    values = torch.einsum('bhlc,hdc->blhd', pooled, w_v)
    if pool.kv.bias is not None:
        values = values + b_v
    x = pool.proj_drop(pool.proj(values.reshape(B, num_latents,
                                                heads * head_dim)))
    if pool.mlp is not None:
        x = x + pool.mlp(pool.norm(x))
    if pool.pool == 'token':
        return x[:, 0]
    if pool.pool == 'avg':
        return x.mean(1)
    return x


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
