"""Heads and head parts for the toolboxes: zero-shot heads on the inherited
CLIP path, ``kiv.ZeroShotClsHead`` (mmpretrain) and ``kiv.TextSegHead``
(mmseg), and ``kiv.SingleRoIExtractor`` (mmdet: RoI layers such as
``kiv.RoIAlign``).

Importing this package imports mmpretrain's, mmseg's and mmdet's heads, so
``import kiv`` does not: ``kiv.MODELS`` imports it on its first lookup
(its ``locations``), so ``custom_imports = dict(imports=['kiv'])`` and
``type='kiv.ZeroShotClsHead'`` work in any toolbox config. The
toolbox-free parts (the text classifier here; :class:`InheritedPath`, which
they re-export, is a connector) import no toolbox.
"""
from ..connectors.inherited_path import (InheritedPath,
                                         InheritedPathError)
from .text_classifier import CLIP_LOGIT_SCALE, text_logits
from .roi_extractor import SingleRoIExtractor
from .text_seg_head import TextSegHead
from .zero_shot_cls_head import ZeroShotClsHead

__all__ = [
    'InheritedPath', 'InheritedPathError', 'CLIP_LOGIT_SCALE', 'text_logits',
    'SingleRoIExtractor', 'TextSegHead', 'ZeroShotClsHead'
]
