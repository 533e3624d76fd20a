"""Zero-shot heads on the inherited CLIP path: ``kiv.ZeroShotClsHead``
(mmpretrain) and ``kiv.TextSegHead`` (mmseg).

Importing this package imports mmpretrain's and mmseg's heads, so
``import kiv`` does not: ``kiv.MODELS`` imports it on its first lookup
(its ``locations``), so ``custom_imports = dict(imports=['kiv'])`` and
``type='kiv.ZeroShotClsHead'`` work in any toolbox config. The
toolbox-free parts (:class:`InheritedPath`, the text classifier) are in
submodules that import no toolbox.
"""
from .inherited_path import InheritedPath, InheritedPathError
from .text_classifier import CLIP_LOGIT_SCALE, text_logits
from .text_seg_head import TextSegHead
from .zero_shot_cls_head import ZeroShotClsHead

__all__ = [
    'InheritedPath', 'InheritedPathError', 'CLIP_LOGIT_SCALE', 'text_logits',
    'TextSegHead', 'ZeroShotClsHead'
]
