"""The fixed text classifier shared by the zero-shot heads: CLIP class
embeddings from a text-embedding file, scored by scaled cosine."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kiv.fileio.text_embeddings import TextEmbeddings, load_text_embeddings

__all__ = ['CLIP_LOGIT_SCALE', 'load_classes', 'text_logits']

#: CLIP's learned temperature, clamped at 100 in training (exp(4.6052))
CLIP_LOGIT_SCALE = 100.0


def load_classes(path: str, num_classes: Optional[int],
                 owner: str) -> TextEmbeddings:
    """Read a text-embedding file and check its class count.

    Args:
        path (str): the file (``tools/misc/text_embeddings.py``).
        num_classes (int, optional): the dataset's class count, if given.
        owner (str): the head's name, for errors.

    Returns:
        TextEmbeddings: the file's content.

    Raises:
        ValueError: the counts differ.
    """
    texts = load_text_embeddings(path)
    if num_classes is not None and num_classes != len(texts.classes):
        raise ValueError(
            f'{owner}: num_classes={num_classes} but {path} holds '
            f'{len(texts.classes)} classes; write it with the dataset\'s '
            'class names (tools/misc/text_embeddings.py --classes)')
    return texts


def text_logits(x: Tensor, embeddings: Tensor, logit_scale: float,
                dim: int = 1) -> Tensor:
    """``logit_scale * cos(x, class embedding)`` for every class.

    Args:
        x (Tensor): image embeddings ``(B, D)`` or maps ``(B, D, H, W)``,
            channels in ``dim``.
        embeddings (Tensor): ``(K, D)`` unit rows.
        logit_scale (float): CLIP's scale (100).
        dim (int): the channel dim of ``x``. Defaults to 1.

    Returns:
        Tensor: ``(B, K)`` or ``(B, K, H, W)`` float32.
    """
    x = F.normalize(x.float(), dim=dim)
    scores = torch.tensordot(x.movedim(dim, -1), embeddings.float(),
                             dims=([-1], [1]))
    return logit_scale * scores.movedim(-1, dim)
