"""Zero-shot classification through the inherited CLIP summary
(mmpretrain head; imports mmpretrain)."""
from __future__ import annotations

from typing import Optional, Sequence

from mmpretrain.models.heads import ClsHead
from torch import Tensor

from kiv.registry import MODELS
from ..connectors.inherited_path import InheritedPath
from .text_classifier import CLIP_LOGIT_SCALE, load_classes, text_logits

__all__ = ['ZeroShotClsHead']


@MODELS.register_module()
class ZeroShotClsHead(ClsHead):
    """Classify by class names: the student's CLIP summary, brought back to
    CLIP's space by the inherited path, against CLIP text embeddings.

    ``logits = logit_scale * cos(P(path(x)), t_k)`` for every class ``k``:
    ``x`` the student's summary for the CLIP teacher
    (``AdapterViT(out_type='global', summary='clip')``), ``path`` its s2t
    head and inverse standardisation (:class:`InheritedPath`), ``P``
    CLIP's image projection when the teacher's summary is the unprojected
    token (``image_projection=True``; the real recipe's CLIP summary is
    already projected), ``t_k`` the L2-normalised prompt-ensemble text
    embedding of class ``k``. Nothing is trained: the classifier, path and
    projection are fixed buffers / frozen weights read from files.

    Args:
        embeddings (str): text-embedding file
            (``tools/misc/text_embeddings.py``), rows in label order.
        inherited (str, optional): exported student with
            ``inherited_heads`` (``--keep-heads``) or distillation
            checkpoint; None when the input already is in the teacher's
            space (e.g. the teacher's own summary).
        teacher (str): the CLIP teacher's name. Defaults to ``'clip'``.
        num_classes (int, optional): checked against the file.
        logit_scale (float): Defaults to CLIP's 100.
        image_projection (bool): apply the file's ``visual_projection``.
            Defaults to False.
        norm_cfg, act_cfg (dict, optional): the s2t heads' layers, as in
            the distillation's ``SharedLatentSpace``.
        **kwargs: ``ClsHead`` options (``loss``, ``topk``, ``cal_acc``,
            ``init_cfg``).
    """

    def __init__(self,
                 embeddings: str,
                 inherited: Optional[str] = None,
                 teacher: str = 'clip',
                 num_classes: Optional[int] = None,
                 logit_scale: float = CLIP_LOGIT_SCALE,
                 image_projection: bool = False,
                 norm_cfg: Optional[dict] = None,
                 act_cfg: Optional[dict] = None,
                 **kwargs) -> None:
        # scoped: built the same under any default scope (kiv's included)
        kwargs.setdefault('loss', dict(type='mmpretrain.CrossEntropyLoss',
                                       loss_weight=1.0))
        super().__init__(**kwargs)
        name = type(self).__name__
        texts = load_classes(embeddings, num_classes, name)
        self.classes = texts.classes
        self.logit_scale = float(logit_scale)
        self.register_buffer('text_embeddings', texts.embeddings)
        self.path = None if inherited is None else InheritedPath(
            inherited, teacher, norm_cfg=norm_cfg, act_cfg=act_cfg)
        width = None if self.path is None else self.path.out_dim
        self.register_buffer('image_projection', texts.visual_projection
                             if image_projection else None)
        if image_projection:
            if texts.visual_projection is None:
                raise ValueError(f'{name}: image_projection=True but '
                                 f'{embeddings} holds no visual_projection')
            rows = texts.visual_projection.shape[0]
            if width is not None and width != rows:
                raise ValueError(
                    f'{name}: the inherited {teacher!r} summary of '
                    f'{inherited} is {width}-d, the image projection of '
                    f'{embeddings} takes {rows}')
            width = texts.width
        if width is not None and width != texts.width:
            raise ValueError(
                f'{name}: the inherited {teacher!r} summary of {inherited} '
                f'is {width}-d but the text embeddings of {embeddings} are '
                f'{texts.width}-d (another CLIP tower, or set '
                'image_projection)')

    def pre_logits(self, feats: Sequence[Tensor]) -> Tensor:
        """The last backbone output: the student summary ``(B, C)``."""
        return feats[-1]

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Class logits.

        Args:
            feats (tuple[Tensor]): backbone outputs, the last one the
                student's CLIP summary ``(B, C)``.

        Returns:
            Tensor: ``(B, num_classes)`` scaled cosines, float32.
        """
        x = self.pre_logits(feats)
        if self.path is not None:
            x = self.path(x)
        if self.image_projection is not None:
            x = x.float() @ self.image_projection
        return text_logits(x, self.text_embeddings, self.logit_scale, dim=1)
