"""Student-to-teacher heads: ``Linear-LN-GELU-Linear`` (AM-RADIO).

Mixed precision: the MLP runs in the autocast dtype; the knowledge-
preservation skip path (``with_skip=True``) always computes in IEEE float32
(:func:`~kiv.models.layers.precision.fp32_compute`), because at step 0
it must reproduce the teacher's float32 standardiser exactly. Under autocast
the heads return float32.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor, nn

from kiv.registry import MODELS
from ..layers.precision import autocast_enabled, fp32_compute

__all__ = ['S2THead', 'DenseS2THead']


@MODELS.register_module()
class S2THead(BaseModule):
    """MLP from the student's space to one teacher output's space.

    ``fc1 -> norm -> act -> fc2`` over the last dim (channel-last), i.e.
    ``Linear-LN-GELU-Linear`` with the defaults. Used as it is for summaries.

    Args:
        in_dim (int): student channels.
        out_dim (int): teacher channels.
        hidden_dim (int): hidden channels (1280 for a ViT-B student in the
            authors' fork). Defaults to 1280.
        norm_cfg (dict): mmcv norm layer config. Defaults to
            ``dict(type='LN')``.
        act_cfg (dict): mmcv activation config. Defaults to
            ``dict(type='GELU')``.
        with_skip (bool): add a linear skip path, ``out = skip(x) +
            fc2(act(norm(fc1(x))))``, for knowledge preservation: with
            :meth:`init_as_affine` the head starts as a given affine map
            (e.g. the teacher's standardiser, when the student *is* that
            teacher) and ``fc2`` starts at zero. The skip path computes in
            float32 under any autocast (:meth:`skip_path`). Defaults to
            False.
        init_cfg (dict | list[dict], optional): mmengine init config.
            Defaults to truncated normal (std 0.02) Linear weights, zero bias.
    """

    def __init__(self,
                 in_dim: int,
                 out_dim: int,
                 hidden_dim: int = 1280,
                 norm_cfg: Optional[dict] = None,
                 act_cfg: Optional[dict] = None,
                 with_skip: bool = False,
                 init_cfg: Optional[dict | list[dict]] = None) -> None:
        if init_cfg is None:
            init_cfg = dict(type='TruncNormal', layer='Linear', std=0.02,
                            bias=0.)
        super().__init__(init_cfg=init_cfg)
        for key, value in (('in_dim', in_dim), ('out_dim', out_dim),
                           ('hidden_dim', hidden_dim)):
            if value < 1:
                raise ValueError(f'{type(self).__name__}: {key} must be >= 1, '
                                 f'got {value}')
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.norm = build_norm_layer(norm_cfg or dict(type='LN'),
                                     hidden_dim)[1]
        self.act = build_activation_layer(act_cfg or dict(type='GELU'))
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.skip = nn.Linear(in_dim, out_dim) if with_skip else None

    @torch.no_grad()
    def init_as_affine(self, weight: Tensor, bias: Tensor) -> None:
        """Start as the affine map ``x -> weight @ x + bias`` exactly.

        Sets the skip path to ``(weight, bias)`` and ``fc2`` to zero, so the
        head's output is that map until training moves it; ``fc1`` keeps its
        random init, so ``fc2`` gets gradients from the first step.

        Args:
            weight (Tensor): ``(out_dim, in_dim)``.
            bias (Tensor): ``(out_dim,)``.
        """
        if self.skip is None:
            raise RuntimeError(f'{type(self).__name__}: init_as_affine needs '
                               f'with_skip=True')
        self.skip.weight.copy_(weight)
        self.skip.bias.copy_(bias)
        self.fc2.weight.zero_()
        self.fc2.bias.zero_()

    def skip_path(self, x: Tensor) -> Tensor:
        """The linear skip path ``skip(x)`` in IEEE float32.

        Runs outside any autocast with float32 input and weights (float64
        if ``x`` is float64), so that at step 0 it reproduces the teacher's
        float32 standardiser exactly (knowledge preservation) also under
        bf16 / fp16 AMP.

        Args:
            x (Tensor): ``(..., in_dim)``, channel-last, any float dtype.

        Returns:
            Tensor: ``(..., out_dim)``, float32 (float64 for float64 input).
        """
        if self.skip is None:
            raise RuntimeError(f'{type(self).__name__}: no skip path '
                               f'(with_skip=False)')
        dtype = torch.promote_types(x.dtype, torch.float32)
        with fp32_compute(x.device.type):
            bias = self.skip.bias
            return F.linear(x.to(dtype), self.skip.weight.to(dtype),
                            None if bias is None else bias.to(dtype))

    def _tail(self, hidden: Tensor, x: Tensor) -> Tensor:
        """``fc2(act(norm(hidden)))`` (+ ``skip_path(x)``) over the last
        dim.

        Args:
            hidden (Tensor): ``(..., hidden_dim)``, the output of ``fc1``.
            x (Tensor): ``(..., in_dim)``, the head's input.

        Returns:
            Tensor: ``(..., out_dim)``; float32 under autocast or with the
            skip path, else the dtype of ``fc2``.
        """
        out = self.fc2(self.act(self.norm(hidden)))
        if self.skip is not None:
            out = out + self.skip_path(x)
        if autocast_enabled(out.device.type):
            out = out.to(torch.promote_types(out.dtype, torch.float32))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Project channel-last input.

        Args:
            x (Tensor): ``(..., in_dim)``, e.g. a summary ``(B, in_dim)``.

        Returns:
            Tensor: ``(..., out_dim)``, float32 under autocast (see
            :meth:`_tail`).
        """
        if x.shape[-1] != self.in_dim:
            raise ValueError(f'{type(self).__name__}: expected {self.in_dim} '
                             f'channels in the last dim, got shape '
                             f'{tuple(x.shape)}')
        return self._tail(self.fc1(x), x)


@MODELS.register_module()
class DenseS2THead(S2THead):
    """:class:`S2THead` for NCHW maps, resized to the teacher's grid.

    The output is ``MLP(interpolate(x, size))``: the student map is resized
    bilinearly (``align_corners=False``) to the teacher grid first, on the
    student's channels (e.g. 768) rather than on the wider hidden layer
    (1280), then the MLP runs channel-last. A map already at the teacher grid
    (e.g. the student's patch-grid level for the knowledge base) is not
    resized at all.

    Args: see :class:`S2THead`.
    """

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """Project a student map onto a teacher grid.

        Args:
            x (Tensor): student map ``(B, in_dim, H, W)``.
            size (tuple[int, int]): teacher grid ``(h_t, w_t)``.

        Returns:
            Tensor: ``(B, out_dim, h_t, w_t)`` (a channel-last memory view),
            float32 under autocast.
        """
        if x.dim() != 4 or x.shape[1] != self.in_dim:
            raise ValueError(f'{type(self).__name__}: expected a (B, '
                             f'{self.in_dim}, H, W) map, got shape '
                             f'{tuple(x.shape)}')
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f'{type(self).__name__}: size must be '
                             f'(h, w) with positive entries, got {size}')
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size, mode='bilinear', align_corners=False)
        x = x.permute(0, 2, 3, 1)
        return self._tail(self.fc1(x), x).permute(0, 3, 1, 2)
