"""Weighted gathers of table rows and their transpose.

Bilinear sampling of a feature map at arbitrary points is a weighted sum of
table rows: the map laid out as a ``(rows, C)`` table (one row per pixel),
and each output row (a *bag*) the sum of ``weight * row`` over the corners
it reads. One ``embedding_bag`` computes every bag at once; its gradient
with respect to the table is the *transposed* gather: each table row sums
``weight * grad`` over the bags that read it, computed here as one more
``embedding_bag`` over the output gradient with the entries sorted by table
row (PyTorch's own ``embedding_bag`` backward on CPU is a scatter that is
several times slower).

Used by kiv's deformable sampling
(:mod:`~kiv.models.layers.deform_sampling`) and RoIAlign
(:mod:`~kiv.models.layers.roi_align`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ['transposed_gather', 'weighted_gather']


def transposed_gather(grad_rows: Tensor, index: Tensor, weights: Tensor,
                      num_rows: int,
                      offsets: Optional[Tensor] = None) -> Tensor:
    """Gradient of a weighted gather with respect to its table.

    Args:
        grad_rows (Tensor): ``(M, C)`` gradient of the ``M`` bag outputs.
        index (Tensor): long table rows the bags read: ``(M, K)`` (``K``
            entries per bag) or flat ``(E,)`` with ``offsets``.
        weights (Tensor): the entries' weights, shaped as ``index``.
        num_rows (int): rows ``T`` of the table.
        offsets (Tensor, optional): ``(M,)`` long start of each bag in a
            flat ``index``. Defaults to None: ``index`` is ``(M, K)``.

    Returns:
        Tensor: ``(T, C)``, row ``t`` = sum of ``weight * grad_rows[bag]``
        over the entries reading row ``t``.
    """
    flat = index.flatten()
    # int32 keys sort faster
    order = torch.argsort(flat.int() if num_rows < 2**31 else flat)
    counts = torch.bincount(flat, minlength=num_rows)
    if offsets is None:
        bags = torch.div(order, index.shape[1], rounding_mode='floor')
    else:
        sizes = torch.diff(offsets, append=offsets.new_tensor([len(flat)]))
        bags = torch.repeat_interleave(
            torch.arange(len(offsets), device=flat.device),
            sizes).index_select(0, order)
    return F.embedding_bag(
        bags, grad_rows, counts.cumsum(0) - counts,
        per_sample_weights=weights.flatten().index_select(0, order),
        mode='sum')


class _WeightedGather(torch.autograd.Function):
    """``embedding_bag(index, table, offsets, weights, 'sum')`` with the
    transposed gather as the table's gradient (the index and weights get
    none)."""

    @staticmethod
    def forward(ctx: FunctionCtx, table: Tensor, index: Tensor,
                weights: Tensor, offsets: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(index, weights, offsets)
        ctx.num_rows = table.shape[0]
        return F.embedding_bag(index, table, offsets,
                               per_sample_weights=weights, mode='sum')

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple:
        index, weights, offsets = ctx.saved_tensors
        grad_table = None
        if ctx.needs_input_grad[0]:
            grad_table = transposed_gather(grad_out.contiguous(), index,
                                           weights, ctx.num_rows, offsets)
        return grad_table, None, None, None


def weighted_gather(table: Tensor, index: Tensor, weights: Tensor,
                    offsets: Optional[Tensor] = None) -> Tensor:
    """Sum of weighted table rows per bag, differentiable in the table.

    Args:
        table (Tensor): ``(T, C)``.
        index (Tensor): long rows: ``(M, K)``, or flat ``(E,)`` with
            ``offsets``.
        weights (Tensor): shaped as ``index``, the table's dtype; no
            gradient flows to them.
        offsets (Tensor, optional): ``(M,)`` long start of each bag in a
            flat ``index``, non-decreasing (empty bags give zeros).

    Returns:
        Tensor: ``(M, C)``.
    """
    if (offsets is None) != (index.dim() == 2):
        raise ValueError('weighted_gather: a flat index needs offsets, a '
                         f'2-D one none; got a {index.dim()}-D index and '
                         f'offsets={offsets is not None}')
    return _WeightedGather.apply(table, index, weights.detach(), offsets)
