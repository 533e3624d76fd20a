"""Pack a loaded image into the ``inputs`` / ``data_samples`` pair."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine.structures import BaseDataElement

from kiv.registry import TRANSFORMS

#: metainfo key listing the unreadable files a sample replaced (see
#: :class:`~kiv.datasets.UnlabeledImageDataset`)
SKIPPED_FILES = 'skipped_files'
#: metainfo key with why each of them was skipped (same order and length)
SKIP_CAUSES = 'skip_causes'


@TRANSFORMS.register_module()
class PackImageInputs(BaseTransform):
    """Pack an image for distillation: no labels, only image metainfo.

    Required Keys:

    - img: ``(H, W, C)`` or ``(H, W)`` array (``uint8`` from
      :class:`~kiv.datasets.transforms.LoadImageFromFileSafe`)

    Optional Keys: everything in ``meta_keys``, ``skipped_files`` and
    ``skip_causes``.

    Args:
        meta_keys (Sequence[str]): keys copied into the data sample's
            metainfo when present. ``skipped_files`` and ``skip_causes`` (why
            each was skipped) are always set (empty lists when nothing was
            skipped), so :class:`~kiv.engine.hooks.BadImageReportHook` can
            count skips by cause.
            Defaults to ``('sample_idx', 'img_path', 'ori_shape',
            'img_shape', 'scale_factor', 'flip', 'flip_direction')``.
    """

    def __init__(
        self,
        meta_keys: Sequence[str] = ('sample_idx', 'img_path', 'ori_shape',
                                    'img_shape', 'scale_factor', 'flip',
                                    'flip_direction')
    ) -> None:
        if isinstance(meta_keys, str):
            raise TypeError('PackImageInputs: meta_keys must be a sequence '
                            f'of key names, got the string {meta_keys!r}')
        self.meta_keys = tuple(meta_keys)

    def transform(self, results: dict) -> dict:
        """Convert ``results['img']`` to a CHW tensor and collect metainfo.

        Args:
            results (dict): the pipeline's result dict.

        Returns:
            dict: ``inputs`` (Tensor ``(C, H, W)``, the image's dtype, e.g.
            ``uint8``) and ``data_samples`` (:class:`BaseDataElement` whose
            metainfo holds ``meta_keys``, ``skipped_files`` and
            ``skip_causes``).
        """
        if 'img' not in results:
            raise KeyError("PackImageInputs: the results have no 'img'; put "
                           'a loading transform (e.g. '
                           "type='kiv.LoadImageFromFileSafe') first in the "
                           'pipeline')
        img = results['img']
        if img.ndim == 2:
            img = img[..., None]
        # one copy either way: permute a contiguous array in torch, or make
        # the transposed view contiguous in NumPy (as mmdet's PackDetInputs)
        if img.flags.c_contiguous:
            inputs = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        else:
            inputs = torch.from_numpy(
                np.ascontiguousarray(img.transpose(2, 0, 1)))
        metainfo = {k: results[k] for k in self.meta_keys if k in results}
        skipped = list(results.get(SKIPPED_FILES, ()))
        causes = list(results.get(SKIP_CAUSES, ()))
        causes += ['unknown'] * (len(skipped) - len(causes))
        metainfo[SKIPPED_FILES] = skipped
        metainfo[SKIP_CAUSES] = causes[:len(skipped)]
        return dict(inputs=inputs,
                    data_samples=BaseDataElement(metainfo=metainfo))

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(meta_keys={self.meta_keys})'
