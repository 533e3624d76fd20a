"""Open-vocabulary segmentation through the inherited dense CLIP output
(mmseg decode head; imports mmseg)."""
from __future__ import annotations

from typing import Optional, Sequence

from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from torch import Tensor

from kiv.registry import MODELS
from ..connectors.inherited_path import InheritedPath
from .text_classifier import CLIP_LOGIT_SCALE, load_classes, text_logits

__all__ = ['TextSegHead']


@MODELS.register_module()
class TextSegHead(BaseDecodeHead):
    """Score every pixel against class names in CLIP's text space.

    ``seg_logits[k] = logit_scale * cos(path(x), t_k)`` per pixel: ``x`` the
    student map ``inputs[in_index]``, ``path`` the s2t dense head and
    inverse standardisation of the CLIP teacher's text-space level
    (``features=dict(..., text_space=...)`` in the distillation config,
    :class:`InheritedPath`), run at the student map's own grid; ``t_k`` the
    class text embeddings. Nothing is trained (no ``conv_seg``).

    Args:
        embeddings (str): text-embedding file, rows in label order.
        inherited (str, optional): exported student with
            ``inherited_heads`` or distillation checkpoint; None when the
            input already is the teacher's text-space map.
        in_channels (int): channels of the student map.
        in_index (int): the student level read (e.g. 2, stride 16, the
            level the CLIP teacher is distilled on).
        teacher (str): the CLIP teacher's name. Defaults to ``'clip'``.
        level (int): the teacher's text-space level (negative from the
            last). Defaults to -1 (``text_space`` is the last level).
        num_classes (int, optional): checked against the file; defaults to
            its class count.
        logit_scale (float): Defaults to CLIP's 100.
        head_norm_cfg, head_act_cfg (dict, optional): the s2t heads'
            ``norm_cfg`` / ``act_cfg`` in the distillation's
            ``SharedLatentSpace`` (mmseg's ``norm_cfg`` is the decode
            head's own).
        **kwargs: ``BaseDecodeHead`` options (``align_corners``,
            ``threshold``, ``loss_decode``...).
    """

    def __init__(self,
                 embeddings: str,
                 in_channels: int,
                 in_index: int,
                 inherited: Optional[str] = None,
                 teacher: str = 'clip',
                 level: int = -1,
                 num_classes: Optional[int] = None,
                 logit_scale: float = CLIP_LOGIT_SCALE,
                 head_norm_cfg: Optional[dict] = None,
                 head_act_cfg: Optional[dict] = None,
                 **kwargs) -> None:
        name = type(self).__name__
        texts = load_classes(embeddings, num_classes, name)
        kwargs.setdefault('init_cfg', None)
        # scoped: built the same under any default scope (kiv's included)
        kwargs.setdefault('loss_decode', dict(
            type='mmseg.CrossEntropyLoss', use_sigmoid=False,
            loss_weight=1.0))
        super().__init__(in_channels=in_channels, channels=texts.width,
                         num_classes=len(texts.classes), in_index=in_index,
                         **kwargs)
        del self.conv_seg  # the text embeddings are the classifier
        self.classes = texts.classes
        self.logit_scale = float(logit_scale)
        self.register_buffer('text_embeddings', texts.embeddings)
        self.path = None if inherited is None else InheritedPath(
            inherited, teacher, level=level, norm_cfg=head_norm_cfg,
            act_cfg=head_act_cfg)
        width = in_channels if self.path is None else self.path.out_dim
        if self.path is not None and self.path.in_dim != in_channels:
            raise ValueError(
                f'{name}: in_channels={in_channels} but the inherited '
                f'{teacher!r} level of {inherited} reads '
                f'{self.path.in_dim}-channel student maps')
        if width != texts.width:
            raise ValueError(
                f'{name}: the {teacher!r} text-space maps are {width}-d but '
                f'the text embeddings of {embeddings} are {texts.width}-d')

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """Per-pixel class logits at the student map's grid.

        Args:
            inputs (tuple[Tensor]): the backbone's maps; ``in_index`` picks
                ``(B, in_channels, H, W)``.

        Returns:
            Tensor: ``(B, num_classes, H, W)`` scaled cosines, float32.
        """
        x = self._transform_inputs(inputs)
        if self.path is not None:
            x = self.path(x)
        return text_logits(x, self.text_embeddings, self.logit_scale, dim=1)
