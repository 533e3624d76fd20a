"""Multi-scale deformable attention: mmcv's module with kiv's sampling.

:class:`MSDeformAttn` is mmcv's
:class:`~mmcv.ops.MultiScaleDeformableAttention` (same parameters, same
initialisation, same state dict) with

- its CUDA kernel on GPU (mmcv built with CUDA ops), always fed float32: the
  kernel dispatches float and half only, so under bf16 autocast it would
  fail; like ViT-Adapter's ``custom_fwd(cast_inputs=torch.float32)``, the
  sampling core runs in float32 with autocast off, the projections around
  it in the autocast dtype (:func:`ms_deform_attn`);
- everywhere else kiv's sampling on points-major tensors
  (:mod:`kiv.models.layers.deform_sampling`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from mmcv.ops import MultiScaleDeformableAttention
from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction
from mmcv.utils import IS_CUDA_AVAILABLE, IS_MLU_AVAILABLE
from torch import Tensor

from kiv.registry import MODELS
from .deform_sampling import (deform_sampling_points_major,
                              ms_deform_attn_sampling)

__all__ = ['ms_deform_attn', 'MSDeformAttn']


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
