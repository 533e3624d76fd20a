"""Write scenes in the standard OpenMMLab dataset layouts.

One writer per layout, shared by the tiny test datasets
(:mod:`kiv.testing.tiny_datasets`) and the demo world
(:mod:`kiv_demo.world`, in ``projects/kiv_demo``). A *scene* is any
object with ``image`` (``(H, W, 3)`` uint8 BGR), ``labels`` (class per
object, 0-based), ``masks`` (``(H, W)`` uint8 per object), ``boxes``
(COCO ``[x, y, w, h]`` per object), ``semantic`` (``(H, W)`` uint8, 0 =
background, ``k + 1`` = class ``k``) and ``label`` (the image's class).

Layouts (``root`` is the dataset folder)::

    COCO:     root/annotations/instances_{split}2017.json, root/{split}2017/
    ADE20K:   root/ADEChallengeData2016/{images,annotations}/
              {training,validation}/
    ImageNet: root/{split}/<class dir>/*.JPEG, root/meta/{split}.txt
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Callable, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from kiv.utils.atomic import atomic_write_json

__all__ = [
    'write_coco_split', 'write_ade20k_split', 'write_imagenet_split',
    'write_json'
]

#: ADE20K's folder name for each split
ADE_SPLITS = {'train': 'training', 'val': 'validation'}


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` as JSON atomically (temporary file + rename)."""
    atomic_write_json(obj, path)


def coco_segmentation(mask: np.ndarray, as_rle: bool):
    """A COCO ``segmentation``: polygons, or RLE with string counts."""
    if as_rle:
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle['counts'] = rle['counts'].decode('ascii')
        return rle
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours
            if len(c) >= 3]


def write_coco_split(root: str, split: str, scenes: Sequence,
                     classes: Sequence[str],
                     as_rle: Callable[[int], bool] = lambda label: True
                     ) -> int:
    """Write one COCO 2017 split (images + instances json).

    Args:
        root (str): the ``data/coco`` folder.
        split (str): ``'train'`` or ``'val'``.
        scenes (Sequence): the images, in order (ids 1..N).
        classes (Sequence[str]): category names (ids 1..K).
        as_rle (Callable[[int], bool]): whether objects of a class are
            annotated as RLE (else polygons).

    Returns:
        int: the number of annotations written.
    """
    img_dir = osp.join(root, f'{split}2017')
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    images, anns = [], []
    for i, scene in enumerate(scenes):
        name = f'{i:012d}.jpg'
        h, w = scene.image.shape[:2]
        cv2.imwrite(osp.join(img_dir, name), scene.image,
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append(dict(id=i + 1, file_name=name, height=h, width=w))
        for box, label, mask in zip(scene.boxes, scene.labels, scene.masks):
            anns.append(dict(
                id=len(anns) + 1, image_id=i + 1, category_id=label + 1,
                bbox=box, area=float(mask.sum()), iscrowd=0,
                segmentation=coco_segmentation(mask, as_rle(label))))
    write_json(
        osp.join(root, 'annotations', f'instances_{split}2017.json'),
        dict(images=images, annotations=anns,
             categories=[dict(id=k + 1, name=c)
                         for k, c in enumerate(classes)]))
    return len(anns)


def write_ade20k_split(root: str, split: str, scenes: Sequence) -> None:
    """Write one ADE20K split: ``.jpg`` images and ``.png`` label maps.

    Args:
        root (str): the ``data/ade`` folder.
        split (str): ``'train'`` or ``'val'`` (ADE20K's ``training`` /
            ``validation``); another name is used as it is.
        scenes (Sequence): the images, in order.
    """
    ade_split = ADE_SPLITS.get(split, split)
    base = osp.join(root, 'ADEChallengeData2016')
    img_dir = osp.join(base, 'images', ade_split)
    ann_dir = osp.join(base, 'annotations', ade_split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    for i, scene in enumerate(scenes):
        stem = f'ADE_{ade_split[:5]}_{i:08d}'
        cv2.imwrite(osp.join(img_dir, stem + '.jpg'), scene.image,
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(osp.join(ann_dir, stem + '.png'), scene.semantic)


def write_imagenet_split(root: str, split: str, scenes: Sequence,
                         class_dirs: Sequence[str]) -> list[int]:
    """Write one ImageNet-style split: class folders and a meta file.

    Args:
        root (str): the ``data/imagenet`` folder.
        split (str): ``'train'`` or ``'val'``.
        scenes (Sequence): the images, in order; ``scene.label`` is the class.
        class_dirs (Sequence[str]): folder name of each class.

    Returns:
        list[int]: images per class.
    """
    os.makedirs(osp.join(root, 'meta'), exist_ok=True)
    lines, counts = [], [0] * len(class_dirs)
    for i, scene in enumerate(scenes):
        rel = f'{class_dirs[scene.label]}/{split}_{i:05d}.JPEG'
        os.makedirs(osp.join(root, split, class_dirs[scene.label]),
                    exist_ok=True)
        cv2.imwrite(osp.join(root, split, rel), scene.image,
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        lines.append(f'{rel} {scene.label}')
        counts[scene.label] += 1
    with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return counts
