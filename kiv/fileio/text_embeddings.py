"""The text-embedding file: CLIP class embeddings for zero-shot heads.

A safetensors file written by ``tools/misc/text_embeddings.py`` and read by
``kiv.ZeroShotClsHead`` and ``kiv.TextSegHead``:

* tensor ``embeddings``: ``(num_classes, width)`` float32, one L2-normalised
  row per class (the normalised mean of the normalised embeddings of the
  class's prompts, CLIP's prompt ensemble);
* tensor ``visual_projection`` (optional): ``(vision_width, width)``, the
  tower's image projection (``x @ visual_projection`` maps CLIP's ``ln_post``
  token to the text space), for students that inherit CLIP's unprojected
  token;
* metadata: ``format`` (:data:`TEXT_EMBEDDINGS_FORMAT`), ``classes`` and
  ``templates`` (JSON lists), ``tower`` (what was read) and ``width``.
"""
from __future__ import annotations

import json
import os.path as osp
from dataclasses import dataclass
from typing import Optional, Sequence

import safetensors
import torch
from torch import Tensor

from .teacher_cache_format import write_safetensors_atomic

__all__ = [
    'TEXT_EMBEDDINGS_FORMAT', 'TextEmbeddings', 'TextEmbeddingsError',
    'save_text_embeddings', 'load_text_embeddings'
]

#: ``format`` metadata of a text-embedding file.
TEXT_EMBEDDINGS_FORMAT = 'kiv.text_embeddings.v1'


class TextEmbeddingsError(ValueError):
    """A text-embedding file is missing, unreadable or inconsistent."""


@dataclass
class TextEmbeddings:
    """The content of a text-embedding file.

    Attributes:
        embeddings (Tensor): ``(num_classes, width)`` float32, unit rows.
        classes (list[str]): class names, in row order.
        templates (list[str]): prompt templates (``'{}'`` = class name).
        tower (str): the text tower that made them.
        visual_projection (Tensor, optional): ``(vision_width, width)``.
    """
    embeddings: Tensor
    classes: list[str]
    templates: list[str]
    tower: str
    visual_projection: Optional[Tensor] = None

    @property
    def width(self) -> int:
        """Embedding width (CLIP's joint text-image space)."""
        return int(self.embeddings.shape[1])


def save_text_embeddings(path: str, embeddings: Tensor,
                         classes: Sequence[str], templates: Sequence[str],
                         tower: str,
                         visual_projection: Optional[Tensor] = None) -> None:
    """Write a text-embedding file atomically.

    Args:
        path (str): the ``.safetensors`` file.
        embeddings (Tensor): ``(num_classes, width)``; rows are normalised
            here (float32).
        classes (Sequence[str]): one name per row.
        templates (Sequence[str]): the prompt templates used.
        tower (str): description of the text tower.
        visual_projection (Tensor, optional): ``(vision_width, width)``.

    Raises:
        TextEmbeddingsError: shapes and names disagree.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] != len(classes):
        raise TextEmbeddingsError(
            f'{path}: embeddings of shape {tuple(embeddings.shape)} for '
            f'{len(classes)} classes; expected ({len(classes)}, width)')
    tensors = dict(embeddings=torch.nn.functional.normalize(
        embeddings.detach().float(), dim=-1))
    if visual_projection is not None:
        if visual_projection.dim() != 2 or \
                visual_projection.shape[1] != embeddings.shape[1]:
            raise TextEmbeddingsError(
                f'{path}: visual_projection of shape '
                f'{tuple(visual_projection.shape)} does not end in the '
                f'embedding width {embeddings.shape[1]}')
        tensors['visual_projection'] = visual_projection.detach().float()
    metadata = dict(format=TEXT_EMBEDDINGS_FORMAT,
                    classes=json.dumps(list(classes)),
                    templates=json.dumps(list(templates)),
                    tower=str(tower), width=str(embeddings.shape[1]))
    write_safetensors_atomic(tensors, path, metadata)


def load_text_embeddings(path: str) -> TextEmbeddings:
    """Read and check a text-embedding file.

    Args:
        path (str): a file written by :func:`save_text_embeddings`.

    Returns:
        TextEmbeddings: its content.

    Raises:
        TextEmbeddingsError: the file is missing, not a kiv text-embedding
            file, or its tensors disagree with its metadata.
    """
    hint = ('write it with tools/misc/text_embeddings.py (README, '
            '"Zero-shot and open-vocabulary")')
    if not osp.isfile(path):
        raise TextEmbeddingsError(f'text-embedding file not found: {path}; '
                                  f'{hint}')
    try:
        with safetensors.safe_open(path, framework='pt', device='cpu') as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise TextEmbeddingsError(
            f'{path} is not a readable safetensors file '
            f'({type(err).__name__}: {err}); {hint}') from err
    if meta.get('format') != TEXT_EMBEDDINGS_FORMAT:
        raise TextEmbeddingsError(
            f'{path} is not a kiv text-embedding file (metadata format='
            f'{meta.get("format")!r}, expected {TEXT_EMBEDDINGS_FORMAT!r}); '
            f'{hint}')
    if 'embeddings' not in tensors:
        raise TextEmbeddingsError(f'{path} has no tensor "embeddings"')
    try:
        classes = json.loads(meta['classes'])
        templates = json.loads(meta['templates'])
        width = int(meta['width'])
    except (KeyError, ValueError) as err:
        raise TextEmbeddingsError(
            f'{path}: metadata classes/templates/width missing or not JSON '
            f'({err})') from err
    emb = tensors['embeddings']
    if tuple(emb.shape) != (len(classes), width):
        raise TextEmbeddingsError(
            f'{path}: embeddings have shape {tuple(emb.shape)}, the metadata '
            f'says {len(classes)} classes of width {width}')
    return TextEmbeddings(emb.float(), list(classes), list(templates),
                          meta.get('tower', ''),
                          tensors.get('visual_projection'))
