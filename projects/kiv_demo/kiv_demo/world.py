"""A procedural multi-task world and a real-photo set for the demo.

Scenes are small images (64-96 px) of objects of :data:`CLASSES` (the class
is the *shape*; colour is only correlated with it) with varied size,
rotation, colour and fill texture, occluding each other on textured
backgrounds (tinted crops of scikit-image's real texture photos, gradients,
stripes or noise). Every scene carries its image label (the class of the
largest visible object), boxes, instance masks and a semantic map, and is
written once into three real dataset layouts::

    coco/      annotations/instances_{train,val}2017.json, {train,val}2017/
               (instance masks as COCO RLE: occluded or ringed shapes are
               exact)
    ade/       ADEChallengeData2016/{images,annotations}/{training,validation}
               (0 = background, k + 1 = class k: ``reduce_zero_label``)
    imagenet/  {train,val}/<class>/*.JPEG, meta/{train,val}.txt
    labels/    {train,val}2017/<coco file stem>.png: every annotation of a
               scene in one 3-channel PNG (channel 0 = instance id, 0 for
               background, ``i + 1`` for the ``i``-th COCO annotation of
               the image; channel 1 = semantic class, 0 = background,
               ``k + 1`` = class ``k``), so a crop / resize / flip of an
               image can be applied to all its labels at once
               (:class:`~kiv_demo.transforms.WorldViewLabels`)

so mmdet's ``CocoDataset``, mmseg's segmentation datasets and mmpretrain's
``ImageNet`` read them as they are. Image ``i`` of a split is the same scene
in every layout (COCO id ``i + 1``, ADE index ``i``, line ``i`` of the
ImageNet meta file); ImageNet's ``val`` split may go on with
classification-only scenes (``WorldConfig.num_val_cls``), as ImageNet's
validation set is larger than COCO's.

The real-photo set (:func:`write_photo_crops`) takes the photos shipped in
scikit-image and matplotlib; some are held out (:data:`HELDOUT_PHOTOS`) and
only their random crops are used to measure inherited-head agreement.
"""
from __future__ import annotations

import json
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

from kiv.testing.layouts import (write_ade20k_split, write_coco_split,
                                 write_imagenet_split, write_json)

__all__ = [
    'CLASSES', 'TRAIN_PHOTOS', 'HELDOUT_PHOTOS', 'Scene', 'WorldConfig',
    'draw_scene', 'write_world', 'write_label_maps', 'label_map_path',
    'load_photo', 'write_photo_crops', 'world_images', 'imagenet_meta',
    'world_cls_images', 'world_cls_only_images', 'world_labels'
]

#: object classes; a class is a shape.
CLASSES = ('disc', 'square', 'triangle', 'star', 'ring', 'cross')
#: preferred hue (OpenCV HSV, 0-179) of each class, used with
#: probability ``WorldConfig.colour_bias``.
_CLASS_HUES = (0, 30, 60, 90, 120, 150)
#: scikit-image grey texture photos used as backgrounds.
_TEXTURES = ('brick', 'grass', 'gravel')
#: photos the distillation trains on: scikit-image and matplotlib samples.
TRAIN_PHOTOS = ('astronaut', 'coffee', 'hubble_deep_field',
                'immunohistochemistry', 'retina', 'colorwheel', 'camera',
                'coins', 'moon', 'page', 'logo', 'brick', 'grass', 'gravel',
                'mpl:Minduka_Present_Blue_Pack.png', 'mpl:logo2.png')
#: photos never seen in training; their crops measure agreement.
HELDOUT_PHOTOS = ('chelsea', 'rocket', 'mpl:grace_hopper.jpg')


@dataclass
class WorldConfig:
    """Size and difficulty of the generated world.

    Args:
        size (int): image side in pixels. Defaults to 64.
        num_train (int): labelled training scenes (split ``train``: in
            the demo, the user's small labelled split). Defaults to 600.
        num_val (int): validation scenes. Defaults to 120.
        num_val_cls (int): classification-only validation scenes: the
            ImageNet layout's ``val`` split holds the ``num_val``
            validation scenes followed by these (as ImageNet's validation
            set is larger than COCO's); COCO and ADE20K hold the first
            ``num_val``. Drawn after every other split, so no other split
            depends on their number. Defaults to 0.
        num_teachers (int): labelled scenes of split ``teachers`` (the
            teachers' own training data, never given to the user).
            Defaults to 0.
        num_unlabelled (int): scenes written as images only
            (``unlabelled/``). Defaults to 0.
        max_objects (int): at most this many objects per scene.
        min_scale (float): smallest object side as a fraction of ``size``.
        max_scale (float): largest object side as a fraction of ``size``.
        colour_bias (float): probability that an object takes its class's
            preferred hue (otherwise any hue): colour is a cue, shape is the
            class.
        min_area (int): objects with fewer visible pixels are dropped.
    """
    size: int = 64
    num_train: int = 600
    num_val: int = 120
    num_val_cls: int = 0
    num_teachers: int = 0
    num_unlabelled: int = 0
    max_objects: int = 4
    min_scale: float = 0.22
    max_scale: float = 0.55
    colour_bias: float = 0.6
    min_area: int = 24


@dataclass
class Scene:
    """One generated image with its annotations.

    Attributes:
        image (np.ndarray): ``(H, W, 3)`` uint8 BGR.
        labels (list[int]): class index per visible object.
        masks (list[np.ndarray]): ``(H, W)`` uint8 {0, 1} visible mask per
            object.
        boxes (list[list[int]]): COCO ``[x, y, w, h]`` of each visible mask.
        semantic (np.ndarray): ``(H, W)`` uint8, 0 = background, ``k + 1`` =
            class ``k``.
        label (int): image label: class of the largest visible object.
    """
    image: np.ndarray
    labels: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    boxes: list = field(default_factory=list)
    semantic: np.ndarray | None = None
    label: int = 0


# --------------------------------------------------------------- drawing ---
def _star(n: int, inner: float) -> np.ndarray:
    angles = np.arange(2 * n) * np.pi / n - np.pi / 2
    radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


#: unit outline (in [-1, 1]^2) of the polygonal classes.
_POLYGONS: dict[str, np.ndarray] = {
    'square': np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.8,
    'triangle': np.array([[0, -1], [0.95, 0.75], [-0.95, 0.75]], float),
    'star': _star(5, 0.45),
    'cross': np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3],
                       [1, 0.3], [0.3, 0.3], [0.3, 1], [-0.3, 1],
                       [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]],
                      float),
}


def _shape_mask(name: str, size: int, centre: tuple[float, float],
                radius: float, angle: float, aspect: float) -> np.ndarray:
    """Binary ``(size, size)`` mask of one shape."""
    mask = np.zeros((size, size), np.uint8)
    cx, cy = centre
    if name in ('disc', 'ring'):
        axes = (max(1, int(radius)), max(1, int(radius * aspect)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, np.degrees(angle), 0,
                    360, 1, -1)
        if name == 'ring':
            inner = (max(1, int(axes[0] * 0.5)), max(1, int(axes[1] * 0.5)))
            cv2.ellipse(mask, (int(cx), int(cy)), inner, np.degrees(angle),
                        0, 360, 0, -1)
        return mask
    pts = _POLYGONS[name] * np.array([radius, radius * aspect])
    rot = np.array([[np.cos(angle), -np.sin(angle)],
                    [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T + np.array([cx, cy])
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def _hsv_colour(rng: np.random.Generator, hue: int) -> np.ndarray:
    hsv = np.array([[[hue % 180, rng.integers(140, 256),
                      rng.integers(120, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``(size, size)`` float pattern in [0.5, 1.2]: solid, stripes,
    checkerboard, noise or a gradient."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = int(rng.integers(5))
    period = float(rng.uniform(3, 9))
    theta = float(rng.uniform(0, np.pi))
    if kind == 0:
        pat = np.ones((size, size), np.float32)
    elif kind == 1:
        pat = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi /
                     period) > 0
    elif kind == 2:
        pat = ((xx // period).astype(int) + (yy // period).astype(int)) % 2
    elif kind == 3:
        pat = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32),
                               (0, 0), 1.0) * 2
    else:
        pat = (xx * np.cos(theta) + yy * np.sin(theta)) / (size * 1.5)
    pat = np.asarray(pat, np.float32)
    pat = (pat - pat.min()) / max(float(np.ptp(pat)), 1e-6)
    return 0.5 + 0.7 * pat


class _Backgrounds:
    """Textured backgrounds: tinted real textures, gradients, stripes."""

    def __init__(self) -> None:
        import skimage.data
        self.textures = [
            getattr(skimage.data, name)().astype(np.float32) / 255
            for name in _TEXTURES
        ]

    def __call__(self, rng: np.random.Generator, size: int) -> np.ndarray:
        kind = int(rng.integers(3))
        if kind == 0:  # a crop of a real texture photo, rescaled and tinted
            tex = self.textures[int(rng.integers(len(self.textures)))]
            side = int(rng.integers(size, min(tex.shape[:2])))
            y = int(rng.integers(0, tex.shape[0] - side + 1))
            x = int(rng.integers(0, tex.shape[1] - side + 1))
            grey = cv2.resize(tex[y:y + side, x:x + side], (size, size),
                              interpolation=cv2.INTER_AREA)
        else:
            grey = _pattern(rng, size) - 0.5
        tint = _hsv_colour(rng, int(rng.integers(180))) * float(
            rng.uniform(0.3, 0.7))
        base = float(rng.uniform(40, 110))
        img = base + grey[..., None] * tint[None, None]
        img += rng.normal(0, 6, img.shape)
        return img


def draw_scene(rng: np.random.Generator, cfg: WorldConfig,
               backgrounds: Callable[[np.random.Generator, int], np.ndarray]
               ) -> Scene:
    """Draw one scene.

    Args:
        rng (np.random.Generator): the only source of randomness.
        cfg (WorldConfig): sizes and difficulty.
        backgrounds (callable): ``(rng, size) -> (size, size, 3)`` float
            BGR background.

    Returns:
        Scene: the image and its annotations (at least one object).
    """
    size = cfg.size
    while True:
        img = backgrounds(rng, size)
        masks, labels = [], []
        for _ in range(int(rng.integers(1, cfg.max_objects + 1))):
            cls = int(rng.integers(len(CLASSES)))
            radius = rng.uniform(cfg.min_scale, cfg.max_scale) * size / 2
            centre = tuple(rng.uniform(radius * 0.5, size - radius * 0.5, 2))
            mask = _shape_mask(CLASSES[cls], size, centre, radius,
                               float(rng.uniform(0, 2 * np.pi)),
                               float(rng.uniform(0.75, 1.25)))
            if mask.sum() < cfg.min_area:
                continue
            hue = (_CLASS_HUES[cls] + int(rng.integers(-8, 9))
                   if rng.random() < cfg.colour_bias else
                   int(rng.integers(180)))
            colour = _hsv_colour(rng, hue)
            fill = colour[None, None] * _pattern(rng, size)[..., None]
            img = np.where(mask[..., None] > 0, fill, img)
            for m in masks:  # later objects occlude earlier ones
                m[mask > 0] = 0
            masks.append(mask)
            labels.append(cls)
        keep = [i for i, m in enumerate(masks) if m.sum() >= cfg.min_area]
        if keep:
            break
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    scene = Scene(image=np.clip(img, 0, 255).astype(np.uint8),
                  labels=[labels[i] for i in keep],
                  masks=[masks[i] for i in keep],
                  semantic=np.zeros((size, size), np.uint8))
    for cls, m in zip(scene.labels, scene.masks):
        ys, xs = np.nonzero(m)
        scene.boxes.append([int(xs.min()), int(ys.min()),
                            int(xs.max() - xs.min() + 1),
                            int(ys.max() - ys.min() + 1)])
        scene.semantic[m > 0] = cls + 1
    areas = [int(m.sum()) for m in scene.masks]
    scene.label = scene.labels[int(np.argmax(areas))]
    return scene


# --------------------------------------------------------------- writing ---
def label_map_path(root: str, split: str, index: int) -> str:
    """The label map of image ``index`` of ``split`` under world ``root``.
    """
    return osp.join(root, 'labels', f'{split}2017', f'{index:012d}.png')


def write_label_maps(root: str, split: str, scenes: Sequence[Scene]) -> None:
    """Write every scene's instances and semantic map as one PNG.

    Args:
        root (str): the world folder.
        split (str): ``'train'`` or ``'val'``.
        scenes (Sequence[Scene]): the split's scenes, in order.
    """
    os.makedirs(osp.dirname(label_map_path(root, split, 0)), exist_ok=True)
    for i, scene in enumerate(scenes):
        if len(scene.masks) > 254:
            raise ValueError('a world scene has more than 254 objects')
        labels = np.zeros((*scene.semantic.shape, 3), np.uint8)
        for k, mask in enumerate(scene.masks):
            labels[mask > 0, 0] = k + 1
        labels[..., 1] = scene.semantic
        cv2.imwrite(label_map_path(root, split, i), labels)


def write_world(root: str, cfg: WorldConfig, seed: int = 0) -> dict:
    """Generate the world and write it in the COCO, ADE20K and ImageNet
    layouts under ``root`` (``coco/``, ``ade/``, ``imagenet/``).

    Splits: ``train`` and ``val`` (COCO ``{train,val}2017``, ADE20K
    ``training`` / ``validation``; ImageNet's ``val`` has
    ``cfg.num_val_cls`` more scenes), ``teachers`` if ``cfg.num_teachers``
    (COCO ``teachers2017``, ADE20K ``teachers``, ImageNet ``teachers``),
    and ``cfg.num_unlabelled`` label-free scenes as
    ``unlabelled/<i>.jpg``. Every split is drawn from the same
    distribution with its own scenes.

    Args:
        root (str): output folder (created).
        cfg (WorldConfig): sizes and difficulty.
        seed (int): random seed: the same seed writes the same files.

    Returns:
        dict: ``classes``, image counts per split (``val``'s
        ``cls_images``: the ImageNet layout's), per-class image-label
        counts and per-class object counts (JSON-safe), also written to
        ``root/world.json``.
    """
    rng = np.random.default_rng(seed)
    backgrounds = _Backgrounds()
    summary: dict = dict(classes=list(CLASSES), size=cfg.size, splits={})
    splits = [('train', cfg.num_train), ('val', cfg.num_val)]
    if cfg.num_teachers:
        splits.append(('teachers', cfg.num_teachers))
    drawn = {}
    for split, n in splits:
        drawn[split] = [draw_scene(rng, cfg, backgrounds) for _ in range(n)]
        objects = write_coco_split(osp.join(root, 'coco'), split,
                                   drawn[split], CLASSES)
        write_ade20k_split(osp.join(root, 'ade'), split, drawn[split])
        write_label_maps(root, split, drawn[split])
        summary['splits'][split] = dict(images=n, objects=objects)
    if cfg.num_unlabelled:
        os.makedirs(osp.join(root, 'unlabelled'), exist_ok=True)
        for i in range(cfg.num_unlabelled):
            cv2.imwrite(osp.join(root, 'unlabelled', f'{i:05d}.jpg'),
                        draw_scene(rng, cfg, backgrounds).image,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
        summary['splits']['unlabelled'] = dict(images=cfg.num_unlabelled)
    # classification-only validation scenes, drawn last
    drawn['val'] += [draw_scene(rng, cfg, backgrounds)
                     for _ in range(cfg.num_val_cls)]
    summary['splits']['val']['cls_images'] = len(drawn['val'])
    for split, _ in splits:
        summary['splits'][split]['image_labels'] = write_imagenet_split(
            osp.join(root, 'imagenet'), split, drawn[split], CLASSES)
    write_json(osp.join(root, 'world.json'), summary)
    return summary


# ---------------------------------------------------------------- photos ---
def load_photo(name: str) -> np.ndarray:
    """A shipped real photo as ``(H, W, 3)`` uint8 BGR.

    Args:
        name (str): a ``skimage.data`` function name, or ``'mpl:<file>'``
            for a file of matplotlib's ``mpl-data/sample_data``.

    Returns:
        np.ndarray: the photo (grey and RGBA photos converted).
    """
    if name.startswith('mpl:'):
        import matplotlib
        path = osp.join(matplotlib.get_data_path(), 'sample_data', name[4:])
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f'matplotlib sample photo {path!r} is '
                                    'missing')
        return img
    import skimage.data
    if not hasattr(skimage.data, name):
        raise ValueError(f'skimage.data has no photo {name!r}')
    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return cv2.cvtColor(np.ascontiguousarray(img[..., :3]),
                        cv2.COLOR_RGB2BGR)


def write_photo_crops(out_dir: str, photos: Sequence[str], crops: int,
                      size: int, seed: int = 0,
                      scale: tuple[float, float] = (0.15, 1.0)) -> list[str]:
    """Write ``crops`` random square crops of every photo, resized.

    Args:
        out_dir (str): output folder (created).
        photos (Sequence[str]): photo names, see :func:`load_photo`.
        crops (int): crops per photo; crop 0 is the whole photo (centre
            square).
        size (int): side of the written crops.
        seed (int): random seed.
        scale (tuple[float, float]): crop side range, as a fraction of the
            photo's shorter side.

    Returns:
        list[str]: written file names, sorted.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for photo in photos:
        img = load_photo(photo)
        h, w = img.shape[:2]
        stem = photo.replace('mpl:', '').rsplit('.', 1)[0].lower()
        for k in range(crops):
            frac = 1.0 if k == 0 else float(rng.uniform(*scale))
            side = max(8, int(min(h, w) * frac))
            y = (h - side) // 2 if k == 0 else int(rng.integers(0,
                                                                h - side + 1))
            x = (w - side) // 2 if k == 0 else int(rng.integers(0,
                                                                w - side + 1))
            crop = cv2.resize(img[y:y + side, x:x + side], (size, size),
                              interpolation=cv2.INTER_AREA)
            name = f'{stem}_{k:03d}.jpg'
            cv2.imwrite(osp.join(out_dir, name), crop,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            names.append(name)
    return sorted(names)


# ------------------------------------------- reading the world's layouts ---
def world_images(world: str, split: str) -> list[str]:
    """The world's images of ``split`` in index order (COCO layout)."""
    with open(osp.join(world, 'coco', 'annotations',
                       f'instances_{split}2017.json'), encoding='utf-8') as f:
        images = sorted(json.load(f)['images'], key=lambda im: im['id'])
    return [osp.join(world, 'coco', f'{split}2017', im['file_name'])
            for im in images]


def imagenet_meta(world: str, split: str) -> list[tuple[str, int]]:
    """``(image path, label)`` of every line of the world's ImageNet meta
    file ``imagenet/meta/<split>.txt``, in its order."""
    root = osp.join(world, 'imagenet')
    with open(osp.join(root, 'meta', f'{split}.txt'), encoding='utf-8') as f:
        entries = [line.split() for line in f if line.strip()]
    return [(osp.join(root, split, rel), int(label)) for rel, label in entries]


def world_cls_images(world: str, split: str) -> list[str]:
    """The world's images of ``split`` in the ImageNet layout, in the
    order of their labels (:func:`world_labels`):
    ``val`` has the classification-only validation scenes after the
    others."""
    return [path for path, _ in imagenet_meta(world, split)]


def world_cls_only_images(world: str) -> list[str]:
    """The classification-only validation scenes
    (``WorldConfig.num_val_cls``): the ImageNet layout's val images after
    its first ones, which are :func:`world_images`' val scenes (the same
    files, byte for byte), so a row's outputs on ``world_images(world,
    'val')`` followed by its outputs on these are in the order of the
    classification labels."""
    return world_cls_images(world, 'val')[len(world_images(world, 'val')):]


def world_labels(world: str, split: str) -> list[int]:
    """Image labels of a world split, in the order of
    :func:`world_cls_images` (the ImageNet layout's meta file)."""
    return [label for _, label in imagenet_meta(world, split)]
