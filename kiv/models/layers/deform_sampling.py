"""kiv's multi-scale deformable sampling kernel (CPU and any device).

The sampling core of :class:`~kiv.models.layers.deform_attention.MSDeformAttn`
where mmcv has no compiled kernel: offsets, softmax and locations are
computed points-major, and one ``embedding_bag`` gathers and weighs the four
bilinear corners of every sampling point of every level, head and query in
a single pass (no per-level ``grid_sample``, no ``(B * heads, C, queries,
points)`` intermediate), with an analytic backward. It matches mmcv's
pure-PyTorch path ``multi_scale_deformable_attn_pytorch`` to float
rounding, gradients included.

- :func:`deform_sampling_points_major`: kiv's points-major layout;
- :func:`ms_deform_attn_sampling`: the same in mmcv's layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from .weighted_gather import transposed_gather

__all__ = ['deform_sampling_points_major', 'ms_deform_attn_sampling']


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

    Backward: the value gradient is the transposed gather
    (:func:`~kiv.models.layers.weighted_gather.transposed_gather`); the
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
            # output rows (bags) that read it
            grad_value = transposed_gather(
                grad_rows, index, corner_weights, table.shape[0]).view(
                    heads, B, num_values, channels).permute(1, 2, 0,
                                                            3).contiguous()

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

    The CPU core of
    :class:`~kiv.models.layers.deform_attention.MSDeformAttn` (any device,
    differentiable; see
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
