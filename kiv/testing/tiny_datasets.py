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

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from .layouts import (write_ade20k_split, write_coco_split,
                      write_imagenet_split)

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
        label (int): image label: class of the largest object (0 if none).
    """
    image: np.ndarray
    boxes: list
    labels: list
    masks: list
    semantic: np.ndarray
    label: int = 0


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
    areas = [int(m.sum()) for m in masks]
    label = labels[int(np.argmax(areas))] if areas else 0
    return Scene(image, boxes, labels, masks, semantic, label)


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
    for split, n in (('train', num_train), ('val', num_val)):
        scenes = [draw_scene(rng, size, len(classes)) for _ in range(n)]
        write_coco_split(root, split, scenes, classes,
                         as_rle=lambda label: label % 2 == 1)
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
    for split, n in (('train', num_train), ('val', num_val)):
        write_ade20k_split(root, split, [
            draw_scene(rng, size, len(classes)) for _ in range(n)])
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
    for split, n in (('train', num_train), ('val', num_val)):
        write_imagenet_split(root, split, [
            draw_scene(rng, size, num_classes) for _ in range(n)], classes)
    return classes
