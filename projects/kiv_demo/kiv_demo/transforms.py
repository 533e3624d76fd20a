"""Labels that follow a view: the world's annotations under crop/flip.

The distillation and multi-task pipelines of the demo render *views*
(random resized crop + flip, :class:`kiv.ReplayView`), sampled online or
replayed from the teacher-feature cache. :class:`WorldViewLabels` applies
the same view to the scene's label map (``world/labels/...``, see
:func:`kiv_demo.world.write_label_maps`), so the instances, the semantic
map and the image label describe exactly the pixels the model sees.
:class:`PackWorldInputs` packs the image and those labels into one mmdet
``DetDataSample`` that the mmpretrain, mmdet and mmseg heads all read
(``gt_label``, ``gt_instances``, ``gt_sem_seg``). Images without a label map
(the real photos) stay unlabelled.
"""
from __future__ import annotations

import os.path as osp
from typing import Sequence

import mmcv
import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.structures import InstanceData, PixelData

from kiv.datasets import PackImageInputs

from .registry import TRANSFORMS

__all__ = ['WorldViewLabels', 'PackWorldInputs', 'SEG_IGNORE']

#: ignore index of the semantic maps (background, as ADE20K's
#: ``reduce_zero_label``)
SEG_IGNORE = 255


@TRANSFORMS.register_module()
class WorldViewLabels(BaseTransform):
    """Load a world scene's labels and apply the sample's view to them.

    The label map of ``<world>/coco/<split>2017/<stem>.jpg`` is
    ``<world>/labels/<split>2017/<stem>.png`` (channel 0: instance id,
    channel 1: semantic class + 1). The view in ``results['view_params']``
    (crop box, flip, set by :class:`kiv.ReplayView`) is applied with
    nearest-neighbour resizing to ``results['img_shape']``; without view
    parameters the map is only resized.

    Added keys (labelled images only): ``gt_bboxes`` (``(N, 4)`` float32
    ``x1, y1, x2, y2``), ``gt_bboxes_labels`` (``(N,)`` int64),
    ``gt_masks`` (:class:`BitmapMasks`), ``gt_seg_map`` (``(H, W)`` uint8,
    class ``k`` or :data:`SEG_IGNORE` for background) and, if an object is
    visible, ``gt_label`` (the class of the largest visible object, the
    world's image-label rule).

    Args:
        min_area (int): objects with fewer visible pixels in the view are
            left out of the instances (they stay in the semantic map).
            Defaults to 4.
    """

    def __init__(self, min_area: int = 4) -> None:
        self.min_area = int(min_area)

    @staticmethod
    def label_path(img_path: str) -> str | None:
        """The label map of a world COCO image, or None for other images."""
        split_dir = osp.dirname(img_path)
        if osp.basename(osp.dirname(split_dir)) != 'coco':
            return None
        world = osp.dirname(osp.dirname(split_dir))
        stem = osp.splitext(osp.basename(img_path))[0]
        return osp.join(world, 'labels', osp.basename(split_dir),
                        stem + '.png')

    def _view(self, labels: np.ndarray, results: dict) -> np.ndarray:
        params = results.get('view_params')
        h, w = results['img'].shape[:2]
        if params is not None:
            if tuple(params['image_hw']) != labels.shape[:2]:
                raise ValueError(
                    f'label map of {results.get("img_path")} is '
                    f'{labels.shape[:2]}, the view was made for '
                    f'{tuple(params["image_hw"])}')
            x, y, bw, bh = params['box']
            labels = mmcv.imcrop(labels,
                                 np.array([x, y, x + bw - 1, y + bh - 1]))
        labels = mmcv.imresize(labels, (w, h), interpolation='nearest')
        if params is not None and params['flip']:
            labels = mmcv.imflip(labels,
                                 direction=results.get('flip_direction')
                                 or 'horizontal')
        return labels

    def transform(self, results: dict) -> dict:
        """Attach the view's labels (nothing for unlabelled images).

        Args:
            results (dict): needs ``img`` (the view) and ``img_path``.

        Returns:
            dict: ``results`` with the labels.
        """
        path = self.label_path(results.get('img_path', ''))
        if path is None or not osp.isfile(path):
            return results
        labels = mmcv.imread(path, flag='unchanged')
        if labels is None or labels.ndim != 3:
            raise ValueError(f'unreadable world label map {path}')
        labels = self._view(labels, results)
        ids, semantic = labels[..., 0], labels[..., 1]
        boxes, classes, masks, areas = [], [], [], []
        for inst in np.unique(ids):
            if inst == 0:
                continue
            mask = ids == inst
            area = int(mask.sum())
            if area < self.min_area:
                continue
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            classes.append(int(np.bincount(semantic[mask]).argmax()) - 1)
            masks.append(mask.astype(np.uint8))
            areas.append(area)
        h, w = ids.shape
        results['gt_bboxes'] = np.array(boxes, np.float32).reshape(-1, 4)
        results['gt_bboxes_labels'] = np.array(classes, np.int64)
        results['gt_masks'] = BitmapMasks(
            np.stack(masks) if masks else np.zeros((0, h, w), np.uint8), h,
            w)
        seg = semantic.astype(np.int64) - 1
        seg[semantic == 0] = SEG_IGNORE
        results['gt_seg_map'] = seg.astype(np.uint8)
        if classes:
            results['gt_label'] = classes[int(np.argmax(areas))]
        return results


@TRANSFORMS.register_module()
class PackWorldInputs(PackImageInputs):
    """Pack an image and its (optional) world labels into a
    ``DetDataSample``.

    Like :class:`kiv.PackImageInputs` (same ``inputs`` and metainfo, plus
    ``pad_shape``), and for labelled samples the fields ``gt_instances``
    (``bboxes`` ``(N, 4)`` tensor, as mmdet's data preprocessor leaves
    them, ``labels``, ``masks``),
    ``gt_sem_seg`` (:class:`PixelData`) and ``gt_label`` (``(1,)``
    int64), the names mmdet, mmseg and mmpretrain heads read.

    Args:
        meta_keys (Sequence[str]): see :class:`kiv.PackImageInputs`.
    """

    def __init__(self,
                 meta_keys: Sequence[str] = ('sample_idx', 'img_path',
                                             'ori_shape', 'img_shape',
                                             'scale_factor', 'flip',
                                             'flip_direction')) -> None:
        super().__init__(meta_keys)

    def transform(self, results: dict) -> dict:
        """Pack ``img`` and the labels.

        Args:
            results (dict): the pipeline's result dict.

        Returns:
            dict: ``inputs`` (``(3, H, W)`` uint8) and ``data_samples``
            (:class:`DetDataSample`).
        """
        packed = super().transform(results)
        sample = DetDataSample(metainfo=packed['data_samples'].metainfo)
        h, w = packed['inputs'].shape[-2:]
        sample.set_metainfo(dict(img_shape=(h, w), pad_shape=(h, w),
                                 ori_shape=results.get('ori_shape', (h, w))))
        if 'gt_bboxes' in results:
            inst = InstanceData()
            inst.bboxes = torch.from_numpy(results['gt_bboxes'])
            inst.labels = torch.from_numpy(results['gt_bboxes_labels'])
            inst.masks = results['gt_masks']
            sample.gt_instances = inst
            sample.gt_sem_seg = PixelData(data=torch.from_numpy(
                results['gt_seg_map'].astype(np.int64))[None])
        if 'gt_label' in results:
            sample.set_field(torch.tensor([results['gt_label']]), 'gt_label')
        packed['data_samples'] = sample
        return packed
