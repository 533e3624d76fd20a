"""RoIAlign on CPU as one weighted gather.

mmcv's CPU RoIAlign walks every output element in scalar loops and its
backward scatters one bilinear corner at a time; for the small two-stage
heads kiv's demo trains on CPU (Mask R-CNN on 64 px scenes), its forward
and backward took about a third of a training step. Here every sampling
point of every bin of every RoI is computed at once, and the four bilinear
corners of all of them are summed by one ``embedding_bag`` over the
feature map laid out channels-last (one row per pixel), with the transposed
gather as backward (:mod:`~kiv.models.layers.weighted_gather`). Same
sampling as mmcv's kernel (``pool_mode='avg'``, ``aligned`` either way,
adaptive or fixed ``sampling_ratio``), so the outputs and input gradients
equal mmcv's to float rounding (tested).

- :func:`roi_align`: the kernel;
- :class:`RoIAlign`: mmcv's ``RoIAlign`` module using it on CPU (mmcv's
  compiled kernel elsewhere), ``type='kiv.RoIAlign'`` in a ``roi_layer`` of
  :class:`kiv.SingleRoIExtractor`.
"""
from __future__ import annotations

from typing import Optional

import torch
from mmcv.ops import RoIAlign as _MMCVRoIAlign
from torch import Tensor

from kiv.registry import MODELS
from .weighted_gather import weighted_gather

__all__ = ['roi_align', 'RoIAlign']


def _corners(coord: Tensor,
             size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mmcv's bilinear corners of sampling coordinates along one axis.

    Args:
        coord (Tensor): coordinates in pixels (already known to lie in
            ``[-1, size]``; others get weight 0 by the caller).
        size (int): the axis' length.

    Returns:
        tuple: low and high pixel (long) and their weights.
    """
    coord = coord.clamp(min=0)
    low = coord.floor()
    top = low >= size - 1
    low = torch.where(top, low.new_full((), size - 1), low)
    coord = torch.where(top, low, coord)
    frac = coord - low
    low = low.long()
    high = torch.where(top, low, low + 1)
    return low, high, 1 - frac, frac


def roi_align(input: Tensor, rois: Tensor, output_size: tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = 0,
              aligned: bool = True) -> Tensor:
    """Average RoIAlign, mmcv's sampling, as one weighted gather.

    Bin ``(i, j)`` of a RoI averages ``grid_h x grid_w`` bilinear samples at
    the centres of a regular sub-grid of the bin (``grid`` =
    ``sampling_ratio`` or, if 0, ``ceil(roi size / output size)``); a
    sample more than one pixel outside the map counts as 0, and the average
    divides by ``grid_h * grid_w`` (mmcv's ``roi_align_forward_cpu``).

    Args:
        input (Tensor): ``(N, C, H, W)`` float feature maps.
        rois (Tensor): ``(R, 5)`` ``(batch index, x1, y1, x2, y2)`` in
            image coordinates.
        output_size (tuple[int, int]): ``(out_h, out_w)``.
        spatial_scale (float): image-to-map scale (1 / stride).
        sampling_ratio (int): samples per bin side; 0: adaptive.
        aligned (bool): shift the RoI by half a pixel (pixel centres at
            ``k + 0.5``, Detectron2's ``aligned``); if False, RoIs are at
            least one pixel wide.

    Returns:
        Tensor: ``(R, C, out_h, out_w)``, differentiable in ``input``; NaN
        for a RoI with a NaN / Inf value (no gradient flows from it).

    Raises:
        ValueError: with ``aligned``, a RoI whose ``x2 < x1`` or
            ``y2 < y1`` (as mmcv's kernel).
    """
    num, channels, height, width = input.shape
    out_h, out_w = output_size
    num_rois = rois.shape[0]
    # sampling geometry in float32 (float64 for float64 maps), as mmcv
    ctype = torch.float64 if input.dtype == torch.float64 else torch.float32
    boxes = rois.to(ctype)
    # a NaN / Inf box (a diverged head) would size the sample grid: it is
    # sampled as an empty box and its output is NaN, so the loss is
    # non-finite and the step is skipped (kiv.NonFiniteLossHook), as the
    # deformable sampling does with non-finite locations
    finite = torch.isfinite(boxes).all(1)
    all_finite = bool(finite.all())
    if not all_finite:
        boxes = torch.where(finite[:, None], boxes, boxes.new_zeros(()))
    offset = 0.5 if aligned else 0.0
    start = boxes[:, 1:3] * spatial_scale - offset  # (R, 2) x, y
    extent = boxes[:, 3:5] * spatial_scale - offset - start
    if aligned:
        if num_rois and bool((extent < 0).any()):
            bad = int((extent < 0).any(1).nonzero()[0])
            raise ValueError(
                f'roi_align: RoI {bad} has x2 < x1 or y2 < y1 '
                f'({rois[bad].tolist()}); aligned RoIs cannot have '
                'negative size')
    else:
        extent = extent.clamp(min=1.0)
    out = torch.tensor([out_w, out_h], dtype=ctype, device=input.device)
    bin_size = extent / out  # (R, 2)
    if sampling_ratio > 0:
        grid = torch.full_like(extent, sampling_ratio, dtype=torch.long)
    else:
        grid = torch.ceil(extent / out).long()
    batch = boxes[:, 0].long()
    # the sample grid is padded to the largest of a group of RoIs: groups
    # of similar grids (sorted), at most _MAX_PADDED padded entries each
    order, groups = _groups(grid.max(1).values.clamp(min=1),
                            4 * out_h * out_w)
    parts = []
    for lo, hi in groups:
        sel = slice(lo, hi) if order is None else order[lo:hi]
        parts.append(_bin_entries(start[sel], bin_size[sel], grid[sel],
                                  batch[sel], (out_h, out_w),
                                  (height, width)))
    if parts:
        index, weights, per_bag = (torch.cat(p) for p in zip(*parts))
    else:
        index = per_bag = torch.zeros(0, dtype=torch.long,
                                      device=input.device)
        weights = torch.zeros(0, dtype=ctype, device=input.device)
    table = input.permute(0, 2, 3, 1).reshape(-1, channels)
    pooled = weighted_gather(table, index, weights.to(input.dtype),
                             per_bag.cumsum(0) - per_bag).view(
                                 num_rois, out_h, out_w, channels)
    if order is not None:
        pooled = pooled.index_select(0, torch.argsort(order))
    if not all_finite:
        pooled = torch.where(finite[:, None, None, None], pooled,
                             pooled.new_tensor(float('nan')))
    return pooled.permute(0, 3, 1, 2)


#: padded sample entries of one group of RoIs (int64 index + weights:
#: about 200 MB at 2**24)
_MAX_PADDED = 2**24


def _groups(side: Tensor,
            per_roi: int) -> tuple[Optional[Tensor], list[tuple[int, int]]]:
    """Groups of RoIs whose sample grids are padded together.

    Args:
        side (Tensor): ``(R,)`` long largest grid side of each RoI (>= 1).
        per_roi (int): entries per RoI and sample (``4 * out_h * out_w``).

    Returns:
        tuple: ``order`` (None: all RoIs in one group, in their order; else
        the RoIs sorted by ``side``) and consecutive ``[lo, hi)`` groups of
        that order, each with at most :data:`_MAX_PADDED` padded entries
        (``count * per_roi * max(side)**2``; a RoI alone may exceed it).
    """
    n = len(side)
    if n == 0:
        return None, []
    if n * per_roi * int(side.max())**2 <= _MAX_PADDED:
        return None, [(0, n)]
    order = torch.argsort(side, stable=True)
    groups, lo = [], 0
    sides = side[order].tolist()
    for hi in range(1, n + 1):
        if hi == n or (hi + 1 - lo) * per_roi * sides[hi]**2 > _MAX_PADDED:
            groups.append((lo, hi))
            lo = hi
    return order, groups


def _bin_entries(start: Tensor, bin_size: Tensor, grid: Tensor,
                 batch: Tensor, output_size: tuple[int, int],
                 map_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """The weighted table rows every bin of a group of RoIs reads.

    Args:
        start (Tensor): ``(R, 2)`` RoI corner ``(x, y)`` on the map.
        bin_size (Tensor): ``(R, 2)`` bin width and height.
        grid (Tensor): ``(R, 2)`` long samples per bin along x and y.
        batch (Tensor): ``(R,)`` long image of each RoI.
        output_size (tuple[int, int]): ``(out_h, out_w)``.
        map_size (tuple[int, int]): ``(H, W)``.

    Returns:
        tuple: flat long ``index`` into the ``(N * H * W, C)`` table, its
        ``weights`` (bilinear factor / the bin's sample count) and the
        entries of each of the ``R * out_h * out_w`` bags, in bag order;
        entries of weight 0 (padding of a smaller grid, samples more than a
        pixel off the map) are left out.
    """
    (out_h, out_w), (height, width) = output_size, map_size
    ctype, device = start.dtype, start.device
    grid_max = [max(int(grid[:, k].max()), 1) for k in range(2)]
    count = (grid[:, 0] * grid[:, 1]).clamp(min=1).to(ctype)

    def axis(k: int, bins: int, size: int) -> tuple[Tensor, ...]:
        """Sample corners along axis ``k`` (0: x, 1: y), ``(R, bins,
        grid_max)`` each: low / high pixel and their weights (0 for samples
        outside the RoI's own grid or more than a pixel off the map)."""
        b = torch.arange(bins, dtype=ctype, device=device)
        g = torch.arange(grid_max[k], dtype=ctype, device=device)
        size_k = bin_size[:, k, None, None]
        coord = (start[:, k, None, None] + b[None, :, None] * size_k +
                 (g[None, None, :] + 0.5) * size_k /
                 grid[:, k, None, None].clamp(min=1).to(ctype))
        exists = g[None, None, :] < grid[:, k, None, None]
        inside = (coord >= -1.0) & (coord <= size)
        low, high, w_low, w_high = _corners(coord, size)
        keep = (exists & inside).to(ctype)
        return low, high, w_low * keep, w_high * keep

    x_low, x_high, wx_low, wx_high = axis(0, out_w, width)
    y_low, y_high, wy_low, wy_high = axis(1, out_h, height)
    # entries (R, out_h, out_w, grid_h, 2, grid_w, 2)
    rows_y = (batch[:, None, None, None] * height +
              torch.stack((y_low, y_high), -1))  # (R, out_h, grid_h, 2)
    cols_x = torch.stack((x_low, x_high), -1)  # (R, out_w, grid_w, 2)
    index = (rows_y[:, :, None, :, :, None, None] * width +
             cols_x[:, None, :, None, None, :, :])
    weight_y = torch.stack((wy_low, wy_high), -1) / count[:, None, None,
                                                          None]
    weight_x = torch.stack((wx_low, wx_high), -1)
    weights = (weight_y[:, :, None, :, :, None, None] *
               weight_x[:, None, :, None, None, :, :])
    keep = (weights != 0).view(len(start) * out_h * out_w,
                               4 * grid_max[0] * grid_max[1])
    per_bag = keep.sum(1)
    keep = keep.flatten()
    return index.flatten()[keep], weights.flatten()[keep], per_bag


@MODELS.register_module()
class RoIAlign(_MMCVRoIAlign):
    """mmcv's ``RoIAlign`` with kiv's CPU kernel (:func:`roi_align`).

    Same arguments, defaults and results (to float rounding) as
    ``mmcv.ops.RoIAlign``; on CPU with ``pool_mode='avg'`` and
    ``use_torchvision=False`` (mmdet's settings) it runs :func:`roi_align`,
    elsewhere (CUDA, ``'max'`` pooling, torchvision's op) mmcv's own
    forward. Use it in mmdet configs through
    :class:`kiv.SingleRoIExtractor`::

        bbox_roi_extractor=dict(
            type='kiv.SingleRoIExtractor',
            roi_layer=dict(type='kiv.RoIAlign', output_size=7,
                           sampling_ratio=0),
            out_channels=256, featmap_strides=[4, 8, 16, 32])

    Args:
        output_size (int | tuple[int, int]): ``(out_h, out_w)``.
        spatial_scale (float): image-to-map scale. Defaults to 1.0.
        sampling_ratio (int): samples per bin side, 0 adaptive. Defaults
            to 0.
        pool_mode (str): ``'avg'`` or ``'max'``. Defaults to ``'avg'``.
        aligned (bool): half-pixel shift. Defaults to True.
        use_torchvision (bool): torchvision's op. Defaults to False.
    """

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        """Pool ``rois`` ``(R, 5)`` from ``input`` ``(N, C, H, W)``.

        Returns:
            Tensor: ``(R, C, out_h, out_w)``.
        """
        if (input.device.type != 'cpu' or self.pool_mode != 'avg'
                or self.use_torchvision):
            return super().forward(input, rois)
        return roi_align(input, rois, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned)
