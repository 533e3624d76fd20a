"""Generate tiny datasets in the standard OpenMMLab layouts.

Scenes are drawn procedurally: a few axis-aligned rectangles and ellipses of
``num_classes`` classes (class = colour + shape) on a noisy background. Every
scene gives an image label (largest object), boxes, instance masks (COCO
polygons for rectangles, COCO RLE for ellipses) and a semantic map.

Layouts written (relative to ``root``)::

    coco:     annotations/instances_{train,val}2017.json, {train,val}2017/*.jpg
    ade20k:   ADEChallengeData2016/{images,annotations}/{training,validation}
              (labels: 0 = "other", classes 1..K, for ``reduce_zero_label``)
    imagenet: {train,val}/<class dir>/*.JPEG, meta/{train,val}.txt
"""
from __future__ import annotations

import json
import os
import os.path as osp
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

#: BGR colour per class (distinct hues).
_COLOURS = [(40, 40, 220), (40, 200, 40), (220, 60, 40), (30, 200, 220),
            (200, 40, 200), (220, 200, 40), (128, 128, 255), (0, 128, 255)]


@dataclass
class Scene:
    """One generated image with its annotations.

    Attributes:
        image (np.ndarray): ``(H, W, 3)`` uint8 BGR.
        boxes (list): ``[x, y, w, h]`` per object (COCO xywh).
        labels (list[int]): class index per object, 0-based.
        masks (list[np.ndarray]): ``(H, W)`` uint8 binary mask per object.
        semantic (np.ndarray): ``(H, W)`` uint8, 0 = background, k+1 = class k.
    """
    image: np.ndarray
    boxes: list
    labels: list
    masks: list
    semantic: np.ndarray


def draw_scene(rng: np.random.Generator, size: int, num_classes: int,
               max_objects: int = 3) -> Scene:
    """Draw one random scene (objects do not occlude each other fully).

    Args:
        rng: NumPy random generator (determinism).
        size (int): image side in pixels.
        num_classes (int): number of object classes (<= 8).
        max_objects (int): at most this many objects.

    Returns:
        Scene: image and annotations.
    """
    assert 1 <= num_classes <= len(_COLOURS)
    image = rng.integers(90, 140, (size, size, 3), dtype=np.uint8)
    semantic = np.zeros((size, size), np.uint8)
    boxes, labels, masks = [], [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(num_classes))
        w, h = (int(v) for v in rng.integers(size // 4, size // 2, 2))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        mask = np.zeros((size, size), np.uint8)
        if cls % 2 == 0:
            mask[y:y + h, x:x + w] = 1
        else:
            cv2.ellipse(mask, (x + w // 2, y + h // 2), (w // 2, h // 2), 0,
                        0, 360, 1, -1)
        # Later objects occlude earlier ones: trim earlier masks.
        for m in masks:
            m[mask > 0] = 0
        masks.append(mask)
        labels.append(cls)
        image[mask > 0] = _COLOURS[cls]
        semantic[mask > 0] = cls + 1
    keep = [i for i, m in enumerate(masks) if m.sum() > 16]
    masks = [masks[i] for i in keep]
    labels = [labels[i] for i in keep]
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([int(xs.min()), int(ys.min()),
                      int(xs.max() - xs.min() + 1),
                      int(ys.max() - ys.min() + 1)])
    return Scene(image, boxes, labels, masks, semantic)


def _coco_segmentation(mask: np.ndarray, as_rle: bool):
    """Polygon list (``as_rle=False``) or uncompressed-string RLE dict."""
    if as_rle:
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle['counts'] = rle['counts'].decode('ascii')
        return rle
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    polys = [c.reshape(-1).astype(float).tolist() for c in contours
             if len(c) >= 3]
    return polys


def _write_json(path: str, obj: dict) -> None:
    tmp = path + '.part'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def make_tiny_coco(root: str, num_train: int = 4, num_val: int = 2,
                   size: int = 64,
                   classes: Sequence[str] = ('class0', 'class1'),
                   seed: int = 0) -> list[str]:
    """Write a COCO 2017 style instance-segmentation dataset.

    Even classes are annotated with polygons, odd classes with RLE, so both
    COCO encodings are exercised.

    Args:
        root (str): dataset root (``data/coco`` layout underneath).
        num_train, num_val (int): images per split.
        size (int): image side.
        classes (Sequence[str]): category names (ids 1..K in the json).
        seed (int): random seed.

    Returns:
        list[str]: class names (for the configs' ``metainfo``).
    """
    rng = np.random.default_rng(seed)
    classes = list(classes)
    num_classes = len(classes)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    for split, n in (('train', num_train), ('val', num_val)):
        img_dir = osp.join(root, f'{split}2017')
        os.makedirs(img_dir, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            scene = draw_scene(rng, size, num_classes)
            name = f'{i:012d}.jpg'
            cv2.imwrite(osp.join(img_dir, name), scene.image,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            images.append(dict(id=i + 1, file_name=name, height=size,
                               width=size))
            for box, label, mask in zip(scene.boxes, scene.labels,
                                        scene.masks):
                anns.append(dict(
                    id=len(anns) + 1, image_id=i + 1, category_id=label + 1,
                    bbox=box, area=float(mask.sum()), iscrowd=0,
                    segmentation=_coco_segmentation(mask, label % 2 == 1)))
        _write_json(
            osp.join(root, 'annotations', f'instances_{split}2017.json'),
            dict(images=images, annotations=anns,
                 categories=[dict(id=i + 1, name=c)
                             for i, c in enumerate(classes)]))
    return classes


def make_tiny_ade20k(root: str, num_train: int = 4, num_val: int = 2,
                     size: int = 64,
                     classes: Sequence[str] = ('wall', 'building'),
                     seed: int = 0) -> list[str]:
    """Write an ADE20K (ADEChallengeData2016) style semantic dataset.

    Label PNGs use 0 for "other/ignore" and 1..K for classes, so configs use
    ``reduce_zero_label=True`` exactly like ADE20K.

    Args:
        root (str): the ``data/ade`` directory.
        num_train, num_val (int): images per split.
        size (int): image side.
        classes (Sequence[str]): class names for labels 1..K. The default
            uses ADE20K's first class names, so ``ADE20KDataset`` accepts
            them as a subset of its own classes.
        seed (int): random seed.

    Returns:
        list[str]: class names.
    """
    rng = np.random.default_rng(seed)
    classes = list(classes)
    num_classes = len(classes)
    base = osp.join(root, 'ADEChallengeData2016')
    for split, n in (('training', num_train), ('validation', num_val)):
        img_dir = osp.join(base, 'images', split)
        ann_dir = osp.join(base, 'annotations', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(n):
            scene = draw_scene(rng, size, num_classes)
            stem = f'ADE_{split[:5]}_{i:08d}'
            cv2.imwrite(osp.join(img_dir, stem + '.jpg'), scene.image)
            cv2.imwrite(osp.join(ann_dir, stem + '.png'), scene.semantic)
    return classes


def make_tiny_imagenet(root: str, num_train: int = 4, num_val: int = 2,
                       size: int = 64, num_classes: int = 2,
                       seed: int = 0) -> list[str]:
    """Write an ImageNet style folder dataset with meta files.

    ``{train,val}/<class>/*.JPEG`` plus ``meta/{train,val}.txt`` lines
    ``<relative path> <label>``, as mmpretrain's ``ImageNet`` reads them. The
    image label is the class of the largest object.

    Args:
        root (str): the ``data/imagenet`` directory.
        num_train, num_val (int): images per split.
        size (int): image side.
        num_classes (int): classes, folder names ``n0000000{k}``.
        seed (int): random seed.

    Returns:
        list[str]: class folder names.
    """
    rng = np.random.default_rng(seed)
    classes = [f'n{i:08d}' for i in range(num_classes)]
    os.makedirs(osp.join(root, 'meta'), exist_ok=True)
    for split, n in (('train', num_train), ('val', num_val)):
        lines = []
        for i in range(n):
            scene = draw_scene(rng, size, num_classes)
            areas = [int(m.sum()) for m in scene.masks]
            label = scene.labels[int(np.argmax(areas))] if areas else 0
            rel = f'{classes[label]}/{split}_{i:05d}.JPEG'
            os.makedirs(osp.join(root, split, classes[label]), exist_ok=True)
            cv2.imwrite(osp.join(root, split, rel), scene.image)
            lines.append(f'{rel} {label}')
        with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return classes
