"""Target standardisers of the shared latent space.

Teachers differ in feature magnitude; standardising every teacher output
(summary and each dense level) before the loss keeps the largest-magnitude
teacher from dominating the distillation ("imbalanced transfer").

Hierarchy
---------
* :class:`BaseStandardizer`: the interface (``forward``, ``inverse``,
  ``affine``);
* :class:`IdentityStandardizer` (``standardize='none'``): no statistics;
* :class:`StatisticsStandardizer`: the base of the standardisers driven by a
  mean and a second moment, with two ways to get them: *exact sums*
  (:meth:`~StatisticsStandardizer.load_sums`, the default ``'fixed'``
  statistics of :class:`~kiv.SharedLatentSpace`) or *EMA updates*
  (:meth:`~StatisticsStandardizer.update`, ``statistics='ema'``);
  subclasses :class:`ChannelStandardizer` (per channel) and
  :class:`PHISStandardizer` (PHI-S, the default).

Statistics
----------
Every :class:`StatisticsStandardizer` keeps float64 buffers (saved in
checkpoints, restored by ``load_state_dict``):

* ``num_updates``: number of :meth:`~StatisticsStandardizer.update` calls;
* ``fixed``: True once the statistics are fixed (set exactly by
  :meth:`~StatisticsStandardizer.load_sums`, or ``max_updates`` reached):
  later updates are ignored, also after resuming from a checkpoint;
* ``ema_mean``: (EMA of the) mean, ``(C,)``;
* ``ema_moment2``: (EMA of the) second moment ``E[x x^T]`` (``(C, C)``,
  PHI-S) or ``E[x^2]`` (``(C,)``, per channel).

Fixed statistics (the default): sum the packed
:meth:`~StatisticsStandardizer.batch_sums` of every batch of a warm-up pass
(``kiv.StatisticsWarmupHook``) or of a whole teacher-feature cache and give
the total to :meth:`~StatisticsStandardizer.load_sums`: the statistics are
then the exact statistics of all those samples, and they never move under the
student. The transform is computed once; the training hot path does no
eigendecomposition and no host-device synchronisation (the update counter
and the fixed flag are mirrored in Python).

EMA updates: an update ``s_n = m * s_{n-1} + (1 - m) * batch_n`` with
``m = momentum`` starts from ``s_0 = 0`` and is read *bias-corrected* like
Adam: ``s_n / (1 - m^n)``. After the first update the estimate is exactly
the first batch's statistics; later batches get the normalised weights
``(1 - m) m^(n-k) / (1 - m^n)``. The covariance is ``E[x x^T] - mean
mean^T`` of that weighted mixture of batches, so it also holds the
variation between batch means and stays positive semi-definite. (Exact sums
are stored as one such step from zero, so both modes share the buffers.)

Batch sums (count, ``sum x``, ``sum x x^T``) are all-reduced across ranks
with :func:`mmengine.dist.all_reduce` (a no-op outside distributed runs)
before an update, so every rank holds identical statistics. The Gram matrix
is computed around the batch mean in the input precision (float32 for
half-precision input) and accumulated in float64; eigendecompositions run in
float64.

Precision under mixed precision: every standardiser computes in float32
(float64 for float64 input) under any autocast, inside
:func:`~kiv.models.layers.precision.fp32_compute` (autocast off, IEEE
float32 matmul and convolution kernels: no TF32 on CUDA, no bf16 oneDNN
kernels on CPU, whatever ``torch.set_float32_matmul_precision`` says).
Under an enabled autocast its output is float32 (autocast's convention for
its float32 ops), so the targets, the de-standardised predictions and the
losses built on them are float32; outside autocast the output keeps the
input's dtype.

The transform derived from the statistics (e.g. the PHI-S matrix from an
eigendecomposition) is cached in non-persistent buffers and recomputed
lazily, only after the statistics changed (an update, ``load_sums`` or
``load_state_dict``). Before any statistics exist (``num_updates == 0``)
every standardiser is the identity.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Optional

import torch
import torch.nn.functional as F
from mmengine.dist import all_reduce
from torch import Tensor, nn

from kiv.registry import MODELS
from ..layers.precision import autocast_enabled, fp32_compute
from .rotations import equalizing_rotation, hadamard_matrix

__all__ = [
    'BaseStandardizer', 'StatisticsStandardizer', 'IdentityStandardizer',
    'ChannelStandardizer', 'PHISStandardizer', 'STANDARDIZE_MODES',
    'build_standardizer'
]


def _check_channels(x: Tensor, dim: int, who: str) -> None:
    if x.dim() not in (2, 4):
        raise ValueError(f'{who}: expected (N, C) vectors or (B, C, H, W) '
                         f'maps, got shape {tuple(x.shape)}')
    if x.shape[1] != dim:
        raise ValueError(f'{who}: expected {dim} channels (dim 1), got shape '
                         f'{tuple(x.shape)}')


def _work_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision input, else the input dtype."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) \
        else torch.float32


def _out_dtype(x: Tensor) -> torch.dtype:
    """Output dtype of a standardiser for input ``x``: the work dtype
    (float32 or float64) under an enabled autocast, else ``x.dtype``."""
    return _work_dtype(x) if autocast_enabled(x.device.type) else x.dtype


class BaseStandardizer(nn.Module, metaclass=ABCMeta):
    """Interface of a target standardiser over ``dim`` channels.

    ``forward``/``inverse`` take ``(N, C)`` vectors or ``(B, C, H, W)`` maps
    (channels in dim 1) and return the same shape; they compute in float32
    (float64 for float64 input) whatever the autocast state, and return
    float32 under an enabled autocast, the input's dtype otherwise (see
    :func:`fp32_compute`).

    Args:
        dim (int): number of channels ``C``.
    """
    #: whether :meth:`update` changes anything (False for the identity).
    tracks_statistics: bool = False

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f'{type(self).__name__}: dim must be >= 1, '
                             f'got {dim}')
        self.dim = dim

    @abstractmethod
    def update(self, x: Tensor) -> None:
        """Fold the statistics of a batch ``x`` into the running estimate."""

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """Standardise ``x``."""

    @abstractmethod
    def inverse(self, y: Tensor) -> Tensor:
        """Map standardised ``y`` back to the raw feature space."""

    @abstractmethod
    def affine(self) -> tuple[Tensor, Tensor]:
        """The standardisation as ``y = W x + b``.

        Returns:
            tuple[Tensor, Tensor]: float32 ``W (C, C)`` and ``b (C,)``, e.g.
            to initialise a linear layer that reproduces :meth:`forward`.
        """

    def extra_repr(self) -> str:
        return f'dim={self.dim}'


@MODELS.register_module()
class IdentityStandardizer(BaseStandardizer):
    """No standardisation (``standardize='none'``, for ablations)."""

    def update(self, x: Tensor) -> None:
        """Check the shape only; there are no statistics."""
        _check_channels(x, self.dim, type(self).__name__)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x`` unchanged (as float32 if it is half precision
        under autocast).

        Args:
            x (Tensor): ``(N, C)`` or ``(B, C, H, W)``.

        Returns:
            Tensor: ``x`` itself, or its float32 copy under autocast.
        """
        _check_channels(x, self.dim, type(self).__name__)
        return x.to(_out_dtype(x))

    def inverse(self, y: Tensor) -> Tensor:
        """The identity's inverse: the same as :meth:`forward`."""
        return self.forward(y)

    def affine(self) -> tuple[Tensor, Tensor]:
        """Identity ``W = I``, ``b = 0``."""
        return torch.eye(self.dim), torch.zeros(self.dim)


class StatisticsStandardizer(BaseStandardizer):
    """Base class of standardisers driven by a mean and a second moment.

    The statistics come either exactly from summed batch sums
    (:meth:`load_sums`: the default fixed statistics) or from EMA updates
    (:meth:`update` / :meth:`update_from_sums`); see the module doc.
    Subclasses set :attr:`full_covariance` and implement
    :meth:`_compute_transform`, :meth:`forward` and :meth:`inverse`.

    Args:
        dim (int): number of channels ``C``.
        momentum (float): EMA decay ``m`` in ``[0, 1)``: the running
            estimate keeps ``m`` of its value and takes ``1 - m`` from each
            batch. 0 uses the last batch only. Defaults to 0.99.
        eps (float): added to variances before dividing by their square root.
            Defaults to 1e-6.
        max_updates (int, optional): stop updating after this many updates and
            keep the statistics fixed (the PHI-S paper estimates them once,
            then freezes them; a fixed transform also saves recomputing it).
            None updates for the whole training. Defaults to None.
    """
    tracks_statistics = True
    full_covariance: bool = False

    def __init__(self,
                 dim: int,
                 momentum: float = 0.99,
                 eps: float = 1e-6,
                 max_updates: Optional[int] = None) -> None:
        super().__init__(dim)
        name = type(self).__name__
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f'{name}: momentum must be in [0, 1), got '
                             f'{momentum}')
        if eps < 0:
            raise ValueError(f'{name}: eps must be >= 0, got {eps}')
        if max_updates is not None and max_updates < 1:
            raise ValueError(f'{name}: max_updates must be >= 1 or None, '
                             f'got {max_updates}')
        self.momentum = momentum
        self.eps = eps
        self.max_updates = max_updates
        moment2_shape = (dim, dim) if self.full_covariance else (dim, )
        self.register_buffer('num_updates', torch.zeros((),
                                                        dtype=torch.long))
        self.register_buffer('ema_mean', torch.zeros(dim,
                                                     dtype=torch.float64))
        self.register_buffer('ema_moment2',
                             torch.zeros(moment2_shape, dtype=torch.float64))
        self.register_buffer('fixed', torch.zeros((), dtype=torch.bool))
        # Python mirrors of ``num_updates`` and ``fixed``: reading the
        # buffers would synchronise with the device on every step.
        self._updates = 0
        self._fixed = False
        self._stale = True

    # ------------------------------------------------------------ statistics
    @property
    def initialized(self) -> bool:
        """Whether statistics exist (an update or :meth:`load_sums`)."""
        return self._updates > 0

    @property
    def frozen(self) -> bool:
        """Whether the statistics are fixed (:meth:`load_sums` or
        ``max_updates`` reached): updates are ignored."""
        return self._fixed or (self.max_updates is not None
                               and self._updates >= self.max_updates)

    def freeze(self) -> None:
        """Fix the current statistics for good (saved in checkpoints)."""
        if not self.initialized:
            raise RuntimeError(f'{type(self).__name__}: cannot freeze before '
                               f'any statistics exist')
        self.fixed.fill_(True)
        self._fixed = True

    @property
    def sums_numel(self) -> int:
        """Length of the packed vector of :meth:`batch_sums`."""
        return 1 + self.dim + self.ema_moment2.numel()

    def batch_sums(self, x: Tensor) -> Tensor:
        """This rank's sums of a batch, packed for one ``all_reduce``.

        Args:
            x (Tensor): ``(N, C)`` vectors or ``(B, C, H, W)`` maps.

        Returns:
            Tensor: float64 ``(1 + C + C*C,)`` (PHI-S) or ``(1 + 2C,)``
            (per channel): ``[count, sum x, sum x x^T (or x^2)]``.
        """
        _check_channels(x, self.dim, type(self).__name__)
        x = x.detach()
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1).reshape(-1, self.dim)
        if x.shape[0] == 0:
            raise ValueError(f'{type(self).__name__}: cannot update the '
                             f'statistics with an empty batch')
        x = x.to(_work_dtype(x))
        count = x.shape[0]
        mean = x.mean(dim=0)
        centered = x - mean
        mean = mean.double()
        if self.full_covariance:
            with fp32_compute(x.device.type):
                gram = centered.T @ centered
            moment2 = gram.double() + count * torch.outer(mean, mean)
        else:
            moment2 = centered.square().sum(dim=0).double() + \
                count * mean.square()
        return torch.cat([
            mean.new_tensor([count]), count * mean,
            moment2.flatten()
        ])

    @torch.no_grad()
    def update_from_sums(self, sums: Tensor) -> None:
        """EMA update from (all-reduced) packed sums of :meth:`batch_sums`.

        Args:
            sums (Tensor): float64 ``(sums_numel,)`` vector.
        """
        if sums.shape != (self.sums_numel, ):
            raise ValueError(f'{type(self).__name__}: expected packed sums of '
                             f'shape ({self.sums_numel},), got '
                             f'{tuple(sums.shape)}')
        if self.frozen:
            return
        sums = sums.to(self.ema_mean)
        count = sums[0]
        mean = sums[1:1 + self.dim] / count
        moment2 = sums[1 + self.dim:].view_as(self.ema_moment2) / count
        self.ema_mean.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)
        self.ema_moment2.mul_(self.momentum).add_(
            moment2, alpha=1 - self.momentum)
        self.num_updates += 1
        self._updates += 1
        if self.max_updates is not None and self._updates >= self.max_updates:
            self.fixed.fill_(True)
            self._fixed = True
        self._stale = True

    @torch.no_grad()
    def load_sums(self, sums: Tensor, freeze: bool = True) -> None:
        """Set the statistics exactly from summed :meth:`batch_sums`.

        The packed vectors of any number of batches (and ranks) add up to the
        sums of all their samples; this sets the mean and second moment to
        exactly those samples' statistics, replacing any earlier estimate.

        Args:
            sums (Tensor): float64 ``(sums_numel,)``: ``[count, sum x,
                sum x x^T (or x^2)]`` over all samples.
            freeze (bool): fix the statistics afterwards (later updates are
                ignored). Defaults to True.
        """
        if sums.shape != (self.sums_numel, ):
            raise ValueError(f'{type(self).__name__}: expected packed sums of '
                             f'shape ({self.sums_numel},), got '
                             f'{tuple(sums.shape)}')
        sums = sums.to(self.ema_mean)
        count = sums[0]
        if not bool(count > 0):
            raise ValueError(f'{type(self).__name__}: the sums hold no '
                             f'samples (count = {float(count)})')
        # one EMA step from zero: its bias-corrected value is the statistic
        weight = 1 - self.momentum
        self.ema_mean.copy_(sums[1:1 + self.dim] / count * weight)
        self.ema_moment2.copy_(
            sums[1 + self.dim:].view_as(self.ema_moment2) / count * weight)
        self.num_updates.fill_(1)
        self._updates = 1
        self._stale = True
        if freeze:
            self.freeze()

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Update the statistics with a batch, all-reduced across ranks.

        Every rank must call it the same number of times in the same order
        (it is a collective operation in distributed runs).

        Args:
            x (Tensor): ``(N, C)`` vectors or ``(B, C, H, W)`` maps.
        """
        if self.frozen:
            return
        sums = self.batch_sums(x)
        all_reduce(sums, op='sum')
        self.update_from_sums(sums)

    def _estimates(self) -> tuple[Tensor, Tensor]:
        """Bias-corrected float64 EMA of the mean and the second moment."""
        if not self.initialized:
            raise RuntimeError(f'{type(self).__name__}: no statistics yet '
                               f'(num_updates == 0)')
        correction = 1 - self.momentum**self._updates
        return (self.ema_mean.double() / correction,
                self.ema_moment2.double() / correction)

    @property
    def mean(self) -> Tensor:
        """Estimated mean, float64 ``(C,)``."""
        return self._estimates()[0]

    @property
    def variance(self) -> Tensor:
        """Estimated per-channel variance, float64 ``(C,)``."""
        mean, moment2 = self._estimates()
        if self.full_covariance:
            moment2 = moment2.diagonal()
        return (moment2 - mean.square()).clamp_min(0)

    # ------------------------------------------------------------- transform
    @abstractmethod
    def _compute_transform(self) -> None:
        """Recompute the cached transform buffers from the statistics."""

    def _refresh(self) -> None:
        """Recompute the cached transform if the statistics changed (in
        float64, outside any autocast)."""
        if self._stale:
            with torch.no_grad(), fp32_compute(self.ema_mean.device.type):
                self._compute_transform()
            self._stale = False

    def _load_from_state_dict(self, state_dict: dict, prefix: str,
                              local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list,
                              error_msgs: list) -> None:
        # checkpoints written before ``fixed`` existed: not fixed
        state_dict.setdefault(prefix + 'fixed',
                              torch.zeros((), dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._updates = int(self.num_updates)
        self._fixed = bool(self.fixed)
        self._stale = True

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, momentum={self.momentum}, eps={self.eps}, '
                f'max_updates={self.max_updates}')


@MODELS.register_module()
class ChannelStandardizer(StatisticsStandardizer):
    """Per-channel standardisation (UNIC / DUNE).

    ``y = (x - mean) / sqrt(var + eps)`` per channel, with the EMA statistics
    described in :mod:`kiv.models.connectors.standardizers`;
    ``inverse(y) = y * sqrt(var + eps) + mean``.

    Args:
        dim (int): number of channels ``C``.
        momentum (float): EMA decay. Defaults to 0.99.
        eps (float): variance epsilon. Defaults to 1e-6.
        max_updates (int, optional): freeze after this many updates.
            Defaults to None.
    """
    full_covariance = False

    def __init__(self,
                 dim: int,
                 momentum: float = 0.99,
                 eps: float = 1e-6,
                 max_updates: Optional[int] = None) -> None:
        super().__init__(dim, momentum, eps, max_updates)
        self.register_buffer('offset', torch.zeros(dim), persistent=False)
        self.register_buffer('std', torch.ones(dim), persistent=False)

    def _compute_transform(self) -> None:
        if not self.initialized:
            self.offset.zero_()
            self.std.fill_(1)
            return
        self.offset.copy_(self.mean)
        self.std.copy_((self.variance + self.eps).sqrt())

    def _affine(self, x: Tensor, invert: bool) -> Tensor:
        """``(x - offset) / std`` or its inverse in the work precision.

        Args:
            x (Tensor): ``(N, C)`` or ``(B, C, H, W)``, any float dtype.
            invert (bool): apply the inverse.

        Returns:
            Tensor: same shape, float32 (float64 for float64 input).
        """
        _check_channels(x, self.dim, type(self).__name__)
        self._refresh()
        dtype = _work_dtype(x)
        shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
        with fp32_compute(x.device.type):
            offset = self.offset.to(dtype).view(shape)
            std = self.std.to(dtype).view(shape)
            x = x.to(dtype)
            return torch.addcmul(offset, x, std) if invert \
                else (x - offset) / std

    def forward(self, x: Tensor) -> Tensor:
        """Standardise ``x``.

        Args:
            x (Tensor): ``(N, C)`` or ``(B, C, H, W)``.

        Returns:
            Tensor: same shape; float32 under autocast, else ``x.dtype``.
        """
        return self._affine(x, invert=False).to(_out_dtype(x))

    def inverse(self, y: Tensor) -> Tensor:
        """Undo :meth:`forward`.

        Args:
            y (Tensor): ``(N, C)`` or ``(B, C, H, W)``.

        Returns:
            Tensor: same shape; float32 under autocast, else ``y.dtype``.
        """
        return self._affine(y, invert=True).to(_out_dtype(y))

    def affine(self) -> tuple[Tensor, Tensor]:
        """``W = diag(1 / std)``, ``b = -offset / std``."""
        self._refresh()
        return (torch.diag(1 / self.std).float(),
                (-self.offset / self.std).float())


@MODELS.register_module()
class PHISStandardizer(StatisticsStandardizer):
    r"""PHI-S: PCA-Hadamard isotropic standardisation (RADIOv2.5).

    With the EMA mean :math:`\mu` and covariance
    :math:`\Sigma = U \Lambda U^T` (eigendecomposition in float64,
    eigenvalues clamped at 0, in descending order, each eigenvector's
    largest entry made positive so the basis does not flip sign between
    recomputations):

    .. math::

        y = \alpha R U^T (x - \mu), \qquad
        \alpha = (\operatorname{mean}(\Lambda) + \epsilon)^{-1/2}

    ``U^T`` rotates into PCA coordinates (covariance :math:`\Lambda`); the
    orthogonal :math:`R` spreads every principal component evenly over all
    channels, so :math:`\operatorname{diag}(R \Lambda R^T) =
    \operatorname{mean}(\Lambda)`; the one isotropic scale :math:`\alpha`
    makes that common variance 1. Unlike full whitening, :math:`\alpha R U^T`
    is a scaled rotation: distances and angles between targets are preserved
    up to one factor, and the loss weight of a direction follows its variance.

    :math:`R` is the normalised Hadamard matrix (entries
    :math:`\pm 1/\sqrt{C}`, data independent; see
    :func:`~kiv.models.connectors.rotations.hadamard_matrix`) when one is
    constructed for ``C``; for other ``C`` it is the Givens rotation of
    :func:`~kiv.models.connectors.rotations.equalizing_rotation`, computed from
    :math:`\Lambda` with the same equal-variance guarantee (and exact).

    The inverse is exact: :math:`x = \alpha^{-1} U R^T y + \mu`.

    Args:
        dim (int): number of channels ``C``.
        momentum (float): EMA decay. Defaults to 0.99.
        eps (float): added to the mean eigenvalue. Defaults to 1e-6.
        max_updates (int, optional): freeze after this many updates.
            Defaults to None.
    """
    full_covariance = True

    def __init__(self,
                 dim: int,
                 momentum: float = 0.99,
                 eps: float = 1e-6,
                 max_updates: Optional[int] = None) -> None:
        super().__init__(dim, momentum, eps, max_updates)
        # +-1 entries (exact in any float dtype); None: no construction for
        # ``dim``, use the eigenvalue-dependent Givens rotation instead.
        hadamard = hadamard_matrix(dim, normalized=False)
        self.register_buffer(
            'hadamard',
            None if hadamard is None else hadamard.float(),
            persistent=False)
        self.register_buffer('weight', torch.eye(dim), persistent=False)
        self.register_buffer('bias', torch.zeros(dim), persistent=False)
        self.register_buffer('inv_weight', torch.eye(dim), persistent=False)
        self.register_buffer('inv_bias', torch.zeros(dim), persistent=False)

    @property
    def covariance(self) -> Tensor:
        """Estimated covariance, float64 ``(C, C)``."""
        mean, moment2 = self._estimates()
        cov = moment2 - torch.outer(mean, mean)
        return (cov + cov.T) / 2

    def _compute_transform(self) -> None:
        if not self.initialized:
            for name in ('weight', 'inv_weight'):
                getattr(self, name).copy_(torch.eye(self.dim))
            self.bias.zero_()
            self.inv_bias.zero_()
            return
        mean = self.mean
        eigvals, eigvecs = torch.linalg.eigh(self.covariance)
        eigvals = eigvals.flip(0).clamp_min(0)
        eigvecs = eigvecs.flip(1)
        pivot = eigvecs.abs().argmax(dim=0, keepdim=True)
        eigvecs = eigvecs * eigvecs.gather(0, pivot).sign()
        if self.hadamard is not None:
            rotation = self.hadamard.double() / self.dim**0.5
        else:
            rotation = equalizing_rotation(eigvals)
        alpha = (eigvals.mean() + self.eps).rsqrt()
        weight = alpha * rotation @ eigvecs.T
        inv_weight = eigvecs @ rotation.T / alpha
        self.weight.copy_(weight)
        self.bias.copy_(-weight @ mean)
        self.inv_weight.copy_(inv_weight)
        self.inv_bias.copy_(mean)

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """``weight @ x + bias`` over the channels, in IEEE float32 (float64
        for float64 input) whatever the autocast / TF32 settings.

        Args:
            x (Tensor): ``(N, C)`` or ``(B, C, H, W)``.
            weight (Tensor): ``(C, C)``.
            bias (Tensor): ``(C,)``.

        Returns:
            Tensor: same shape as ``x``, float32 (float64 for float64 input).
        """
        _check_channels(x, self.dim, type(self).__name__)
        dtype = _work_dtype(x)
        with fp32_compute(x.device.type):
            weight, bias = weight.to(dtype), bias.to(dtype)
            x = x.to(dtype)
            if x.dim() == 4:
                return F.conv2d(x, weight[:, :, None, None], bias)
            return F.linear(x, weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        """Standardise ``x``.

        Args:
            x (Tensor): ``(N, C)`` or ``(B, C, H, W)``.

        Returns:
            Tensor: same shape; float32 under autocast, else ``x.dtype``.
        """
        self._refresh()
        return self._linear(x, self.weight, self.bias).to(_out_dtype(x))

    def inverse(self, y: Tensor) -> Tensor:
        """Undo :meth:`forward` exactly.

        Args:
            y (Tensor): ``(N, C)`` or ``(B, C, H, W)``.

        Returns:
            Tensor: same shape; float32 under autocast, else ``y.dtype``.
        """
        self._refresh()
        return self._linear(y, self.inv_weight,
                            self.inv_bias).to(_out_dtype(y))

    def affine(self) -> tuple[Tensor, Tensor]:
        """``W = alpha R U^T``, ``b = -W mu`` (the cached transform)."""
        self._refresh()
        return self.weight.float().clone(), self.bias.float().clone()


#: ``standardize=`` option of :class:`~kiv.SharedLatentSpace` -> class.
STANDARDIZE_MODES: dict[str, type[BaseStandardizer]] = {
    'phis': PHISStandardizer,
    'channel': ChannelStandardizer,
    'none': IdentityStandardizer,
}


def build_standardizer(mode: str, dim: int, **kwargs) -> BaseStandardizer:
    """Build the standardiser of one teacher output.

    Args:
        mode (str): ``'phis'``, ``'channel'`` or ``'none'``.
        dim (int): number of channels.
        **kwargs: ``momentum``, ``eps``, ``max_updates`` (ignored by
            ``'none'``).

    Returns:
        BaseStandardizer: the module.
    """
    if mode not in STANDARDIZE_MODES:
        raise ValueError(f'standardize={mode!r} is not one of '
                         f'{sorted(STANDARDIZE_MODES)}')
    cls = STANDARDIZE_MODES[mode]
    if cls is IdentityStandardizer:
        return cls(dim)
    return cls(dim, **kwargs)
