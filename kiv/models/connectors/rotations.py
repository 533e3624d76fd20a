"""Orthogonal rotations that give every channel the same variance (PHI-S).

PHI-S rotates PCA coordinates ``z`` (covariance ``diag(lambda)``) with an
orthogonal ``R`` such that every output channel has the mean eigenvalue as
its variance: ``diag(R diag(lambda) R^T) = mean(lambda) * 1``.

* :func:`hadamard_matrix` gives the data-independent choice of the PHI-S
  paper: a normalised Hadamard matrix has ``R_ij^2 = 1/C`` for all entries,
  so ``(R diag(lambda) R^T)_ii = sum_j lambda_j / C`` for *any* spectrum.
  Built with the Sylvester, Paley I and Paley II constructions and Kronecker
  products; this covers every common ViT width (256, 384 = 32 x 12,
  768 = 64 x 12, 1024, 1152 = 32 x 36, 1280 = 64 x 20, 1536 = 128 x 12 ...).
* :func:`equalizing_rotation` covers the other widths (Hadamard matrices exist
  only for C = 1, 2 or multiples of 4, and not all of those are constructed
  here): a product of at most ``C - 1`` Givens rotations, built from the
  eigenvalues (the constructive Schur-Horn algorithm of Chan and Li), that
  gives every channel exactly the mean eigenvalue as variance.

Both are built in NumPy and returned as float64 tensors: autocast never
casts float64, and the float32 kernel-precision switches (TF32, bf16 oneDNN
kernels) do not apply to it, so the rotation is exact under mixed precision
too. :class:`~kiv.models.connectors.standardizers.PHISStandardizer` combines it
with the float64 eigendecomposition outside any autocast and applies the
result in IEEE float32.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
from torch import Tensor


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix ``Q_ij = legendre(j - i, q)`` of a prime ``q``."""
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    chi[(np.arange(1, q)**2) % q] = 1
    idx = np.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley_core(n: int) -> Optional[np.ndarray]:
    """A Hadamard matrix of order ``n`` from one Paley construction, or None.

    Paley I: ``n = p + 1`` with ``p`` prime, ``p = 3 (mod 4)``.
    Paley II: ``n = 2 (q + 1)`` with ``q`` prime, ``q = 1 (mod 4)``.
    """
    p = n - 1
    if p % 4 == 3 and _is_prime(p):
        core = np.zeros((n, n), dtype=np.int64)
        core[0, 1:] = 1
        core[1:, 0] = -1
        core[1:, 1:] = _jacobsthal(p)
        return core + np.eye(n, dtype=np.int64)
    if n % 2 == 0:
        q = n // 2 - 1
        if q % 4 == 1 and _is_prime(q):
            core = np.zeros((q + 1, q + 1), dtype=np.int64)
            core[0, 1:] = 1
            core[1:, 0] = 1
            core[1:, 1:] = _jacobsthal(q)
            return (np.kron(core, np.array([[1, -1], [-1, -1]])) +
                    np.kron(np.eye(q + 1, dtype=np.int64),
                            np.array([[1, 1], [1, -1]])))
    return None


@lru_cache(maxsize=None)
def _hadamard_pm1(n: int) -> Optional[np.ndarray]:
    if n < 1:
        raise ValueError(f'hadamard_matrix: order must be >= 1, got {n}')
    sylvester = np.ones((1, 1), dtype=np.int64)
    rest = n
    while True:
        core = np.ones((1, 1), dtype=np.int64) if rest == 1 \
            else _paley_core(rest)
        if core is not None:
            mat = np.kron(sylvester, core)
            # checked with BLAS in float64, exact for +-1 entries (sums of n
            # products +-1); an int64 product of order 1280 takes seconds
            ortho = mat.astype(np.float64)
            if not np.array_equal(ortho @ ortho.T, n * np.eye(n)):
                raise AssertionError(f'hadamard_matrix: construction of '
                                     f'order {n} is not orthogonal')
            mat.setflags(write=False)
            return mat
        if rest % 2:
            return None
        rest //= 2
        sylvester = np.block([[sylvester, sylvester],
                              [sylvester, -sylvester]])


def hadamard_matrix(n: int, normalized: bool = True) -> Optional[Tensor]:
    """Hadamard matrix of order ``n``, if one is constructed.

    Tries ``n = 2^k * m`` with ``m`` = 1 (Sylvester), ``p + 1`` (Paley I) or
    ``2 (q + 1)`` (Paley II) for primes ``p, q``.

    Args:
        n (int): order (number of channels).
        normalized (bool): divide by ``sqrt(n)`` to make it orthogonal.
            Defaults to True.

    Returns:
        Tensor | None: float64 ``(n, n)`` matrix with entries ``+-1/sqrt(n)``
        (orthogonal) or ``+-1`` (``normalized=False``), or None when no
        construction covers ``n``.
    """
    mat = _hadamard_pm1(n)
    if mat is None:
        return None
    mat = torch.from_numpy(mat.astype(np.float64))
    return mat / math.sqrt(n) if normalized else mat


def equalizing_rotation(eigvals: Tensor, rtol: float = 1e-12) -> Tensor:
    """Orthogonal ``R`` with ``diag(R diag(eigvals) R^T) = mean(eigvals)``.

    Greedy Givens construction: among the channels not yet fixed, rotate the
    one with the largest variance ``a`` and the one with the smallest ``b``
    (``a >= m >= b`` for the mean ``m``; their covariance is 0) by the angle
    with ``cos^2 = (m - b) / (a - b)``. The first gets variance ``m`` exactly
    and is fixed; the second gets ``a + b - m``. Trace is preserved, so the
    remaining channels keep mean ``m``; after at most ``C - 1`` rotations
    every channel has variance ``m``.

    Args:
        eigvals (Tensor): ``(C,)`` non-negative eigenvalues.
        rtol (float): stop when all remaining variances are within
            ``rtol * mean`` of the mean.

    Returns:
        Tensor: float64 ``(C, C)`` orthogonal matrix, on ``eigvals.device``.
    """
    d = eigvals.detach().double().cpu().numpy().copy()
    c = d.shape[0]
    m = float(d.mean())
    rot = np.eye(c)
    free = np.ones(c, dtype=bool)
    for _ in range(c - 1):
        i = int(np.where(free, d, -np.inf).argmax())
        j = int(np.where(free, d, np.inf).argmin())
        a, b = d[i], d[j]
        if a - b <= rtol * max(abs(m), 1e-300):
            break
        cos = math.sqrt(min(max((m - b) / (a - b), 0.0), 1.0))
        sin = math.sqrt(1.0 - cos * cos)
        row_i, row_j = rot[i].copy(), rot[j]
        rot[i] = cos * row_i + sin * row_j
        rot[j] = -sin * row_i + cos * row_j
        d[i], d[j] = m, a + b - m
        free[i] = False
    return torch.from_numpy(rot).to(eigvals.device)
