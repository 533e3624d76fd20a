"""Attention pooling by a learnable latent query, without projecting keys.

:func:`latent_attention_pool` computes timm's
:class:`~timm.layers.AttentionPoolLatent` with its key projection folded
into the latent queries (used by the adapter's per-teacher summaries,
``kiv.GlobalToken``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent
from torch import Tensor

__all__ = ['latent_attention_pool']


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
