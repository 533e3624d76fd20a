"""Typed model outputs shared by teachers, the student and the distiller."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class FeatureOutput(NamedTuple):
    """A model's knowledge for one image batch (RADIO's ``summary, features``).

    Attributes:
        summary (Tensor): one vector per image, shape ``(B, C_s)`` (CLS token,
            pooled features or a global token).
        features (tuple[Tensor, ...]): dense maps, each ``(B, C_l, H_l, W_l)``
            (NCHW). A ViT gives one level; a CNN or the adapter pyramid give
            several, ordered from the highest resolution to the lowest.
    """
    summary: Tensor
    features: tuple[Tensor, ...]
