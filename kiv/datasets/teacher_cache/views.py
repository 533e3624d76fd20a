"""Augmented views that can be replayed exactly: crop box + resize + flip.

A cached target belongs to one view of one image. The cache stores each
view's parameters (crop box, flip) and :class:`ReplayView` rebuilds exactly
that view for the student, so student inputs and cached teacher targets
always come from the same pixels.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mmcv
import numpy as np
from mmcv.transforms import BaseTransform

from kiv.fileio.teacher_cache_format import TeacherCacheError
from kiv.registry import TRANSFORMS

__all__ = ['ViewParams', 'ReplayView', 'view_rng', 'split_pipeline']

#: results key holding the :class:`ViewParams` of the sample (as a dict).
VIEW_PARAMS = 'view_params'

_INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'area', 'lanczos')
_DIRECTIONS = ('horizontal', 'vertical')


@dataclass(frozen=True)
class ViewParams:
    """Geometry of one view.

    Attributes:
        box (tuple[int, int, int, int]): crop ``(x, y, w, h)`` in the
            decoded image, pixels.
        flip (bool): whether the resized crop is flipped.
        image_hw (tuple[int, int]): decoded image size ``(H, W)`` the box
            refers to (checked when the view is replayed).
    """
    box: tuple[int, int, int, int]
    flip: bool
    image_hw: tuple[int, int]

    def to_dict(self) -> dict:
        """Plain dict (json-able)."""
        return dict(box=list(self.box), flip=self.flip,
                    image_hw=list(self.image_hw))

    @classmethod
    def from_dict(cls, data: Mapping) -> ViewParams:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(int(v) for v in data['box']), bool(data['flip']),
                   tuple(int(v) for v in data['image_hw']))


def view_rng(seed: int, image_index: int, view: int) -> np.random.Generator:
    """The random generator of one (image, view) pair.

    Independent of processing order, rank and batch: a view is the same in
    every run with the same ``seed``.

    Args:
        seed (int): the cache's seed.
        image_index (int): global index of the image in the cache's list.
        view (int): view number, ``0 <= view < K``.

    Returns:
        numpy.random.Generator: seeded with ``(seed, image_index, view)``.
    """
    return np.random.default_rng([int(seed), int(image_index), int(view)])


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f'ReplayView: {name} must be a positive int or '
                         f'(h, w), got {value!r}')
    return pair  # type: ignore[return-value]


@TRANSFORMS.register_module()
class ReplayView(BaseTransform):
    """Crop box -> resize -> flip, sampled or replayed from stored params.

    The geometric part of a distillation pipeline in one transform whose
    randomness is explicit:

    1. crop ``box = (x, y, w, h)`` of the decoded image, the whole image
       without ``crop_ratio_range`` (then it is ``mmcv.Resize(scale,
       keep_ratio=False)``), else a random-resized-crop box sampled exactly
       like ``mmpretrain.RandomResizedCrop`` (area fraction in
       ``crop_ratio_range``, log-uniform aspect ratio in
       ``aspect_ratio_range``, ``max_attempts`` tries, central-crop
       fallback);
    2. resize to ``scale`` ``(h, w)`` with ``mmcv.imresize``
       (``interpolation``, ``backend``), the same call as mmcv's ``Resize``
       and mmpretrain's ``RandomResizedCrop``, so the pixels are identical;
    3. flip (``mmcv.imflip``, ``flip_direction``) with probability
       ``flip_prob``.

    If ``results['view_params']`` is set (by
    :class:`~kiv.datasets.TeacherCacheDataset`, from the cache) the stored
    view is replayed; otherwise one is sampled from NumPy's global random
    state (like mmcv's random transforms, seeded by mmengine) and stored in
    ``results['view_params']``. :meth:`sample` draws from a given generator
    (the cache writer seeds one per image and view).

    Required Keys: ``img``. Optional: ``view_params``.

    Modified Keys: ``img``, ``img_shape``. Added Keys: ``view_params``,
    ``flip``, ``flip_direction``, ``scale_factor``.

    Args:
        scale (int | tuple[int, int]): output ``(h, w)``.
        crop_ratio_range (tuple[float, float], optional): area fraction of
            the random crop; None crops nothing. Defaults to None.
        aspect_ratio_range (tuple[float, float]): crop aspect ratio (w / h)
            range. Defaults to ``(3 / 4, 4 / 3)``.
        max_attempts (int): tries before the central-crop fallback.
            Defaults to 10.
        flip_prob (float): flip probability. Defaults to 0.
        flip_direction (str): ``'horizontal'`` or ``'vertical'``.
            Defaults to ``'horizontal'``.
        interpolation (str): ``mmcv.imresize`` interpolation. Defaults to
            ``'bilinear'``.
        backend (str): ``'cv2'`` or ``'pillow'``. Defaults to ``'cv2'``.
    """

    def __init__(self,
                 scale: int | Sequence[int],
                 crop_ratio_range: Sequence[float] | None = None,
                 aspect_ratio_range: Sequence[float] = (3. / 4., 4. / 3.),
                 max_attempts: int = 10,
                 flip_prob: float = 0.0,
                 flip_direction: str = 'horizontal',
                 interpolation: str = 'bilinear',
                 backend: str = 'cv2') -> None:
        self.scale = _pair(scale, 'scale')
        if crop_ratio_range is not None:
            lo, hi = (float(v) for v in crop_ratio_range)
            if not 0 < lo <= hi <= 1:
                raise ValueError('ReplayView: crop_ratio_range must satisfy '
                                 f'0 < min <= max <= 1, got '
                                 f'{crop_ratio_range!r}')
            crop_ratio_range = (lo, hi)
        self.crop_ratio_range = crop_ratio_range
        lo, hi = (float(v) for v in aspect_ratio_range)
        if not 0 < lo <= hi:
            raise ValueError('ReplayView: aspect_ratio_range must satisfy '
                             f'0 < min <= max, got {aspect_ratio_range!r}')
        self.aspect_ratio_range = (lo, hi)
        if not isinstance(max_attempts, int) or max_attempts < 0:
            raise ValueError('ReplayView: max_attempts must be an int >= 0, '
                             f'got {max_attempts!r}')
        self.max_attempts = max_attempts
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ValueError(f'ReplayView: flip_prob must be in [0, 1], got '
                             f'{flip_prob!r}')
        self.flip_prob = float(flip_prob)
        if flip_direction not in _DIRECTIONS:
            raise ValueError(f'ReplayView: flip_direction must be one of '
                             f'{_DIRECTIONS}, got {flip_direction!r}')
        self.flip_direction = flip_direction
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f'ReplayView: interpolation must be one of '
                             f'{_INTERPOLATIONS}, got {interpolation!r}')
        self.interpolation = interpolation
        if backend not in ('cv2', 'pillow'):
            raise ValueError(f"ReplayView: backend must be 'cv2' or "
                             f"'pillow', got {backend!r}")
        self.backend = backend

    def config(self) -> dict:
        """The config that rebuilds this transform (stored in the index)."""
        return dict(type='kiv.ReplayView', scale=list(self.scale),
                    crop_ratio_range=None if self.crop_ratio_range is None
                    else list(self.crop_ratio_range),
                    aspect_ratio_range=list(self.aspect_ratio_range),
                    max_attempts=self.max_attempts,
                    flip_prob=self.flip_prob,
                    flip_direction=self.flip_direction,
                    interpolation=self.interpolation, backend=self.backend)

    # --------------------------------------------------------------- sample
    def _crop_box(self, h: int, w: int,
                  rng: np.random.Generator) -> tuple[int, int, int, int]:
        """mmpretrain ``RandomResizedCrop.rand_crop_params`` with ``rng``."""
        if self.crop_ratio_range is None:
            return 0, 0, w, h
        area = h * w
        log_ratio = (math.log(self.aspect_ratio_range[0]),
                     math.log(self.aspect_ratio_range[1]))
        for _ in range(self.max_attempts):
            target_area = rng.uniform(*self.crop_ratio_range) * area
            aspect_ratio = math.exp(rng.uniform(*log_ratio))
            target_w = int(round(math.sqrt(target_area * aspect_ratio)))
            target_h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < target_w <= w and 0 < target_h <= h:
                y = int(rng.integers(0, h - target_h + 1))
                x = int(rng.integers(0, w - target_w + 1))
                return x, y, target_w, target_h
        in_ratio = w / h
        if in_ratio < self.aspect_ratio_range[0]:
            target_w = w
            target_h = int(round(target_w / self.aspect_ratio_range[0]))
        elif in_ratio > self.aspect_ratio_range[1]:
            target_h = h
            target_w = int(round(target_h * self.aspect_ratio_range[1]))
        else:
            target_w, target_h = w, h
        return (w - target_w) // 2, (h - target_h) // 2, target_w, target_h

    def sample(self, image_hw: Sequence[int],
               rng: np.random.Generator) -> ViewParams:
        """Draw one view's parameters.

        Args:
            image_hw (tuple[int, int]): decoded image size ``(H, W)``.
            rng (numpy.random.Generator): the randomness (e.g.
                :func:`view_rng`).

        Returns:
            ViewParams: crop box, flip and image size.
        """
        h, w = int(image_hw[0]), int(image_hw[1])
        box = self._crop_box(h, w, rng)
        # always draw, so the crop stream does not depend on flip_prob = 0
        flip = bool(rng.random() < self.flip_prob)
        return ViewParams(box, flip, (h, w))

    # ---------------------------------------------------------------- apply
    def apply(self, img: np.ndarray, params: ViewParams,
              path: str = '<image>') -> np.ndarray:
        """Render a view.

        Args:
            img (np.ndarray): decoded ``(H, W, C)`` image.
            params (ViewParams): the view.
            path (str): the image file, for error messages.

        Returns:
            np.ndarray: ``(scale[0], scale[1], C)`` view, same dtype.

        Raises:
            TeacherCacheError: the image does not have the size the view was
                made for (the file changed after caching).
        """
        if tuple(img.shape[:2]) != tuple(params.image_hw):
            raise TeacherCacheError(
                f'image {path} is {img.shape[0]}x{img.shape[1]} but its '
                f'cached view was made for a {params.image_hw[0]}x'
                f'{params.image_hw[1]} image: the file changed after the '
                'teacher cache was written; rewrite the cache')
        x, y, w, h = params.box
        if (x, y, w, h) != (0, 0, img.shape[1], img.shape[0]):
            img = mmcv.imcrop(img, np.array([x, y, x + w - 1, y + h - 1]))
        img = mmcv.imresize(img, (self.scale[1], self.scale[0]),
                            interpolation=self.interpolation,
                            backend=self.backend)
        if params.flip:
            img = mmcv.imflip(img, direction=self.flip_direction)
        return img

    def transform(self, results: dict) -> dict:
        """Replay ``results['view_params']`` or sample a view.

        Args:
            results (dict): needs ``img``.

        Returns:
            dict: ``results`` with the view as ``img``.
        """
        img = results['img']
        stored = results.get(VIEW_PARAMS)
        if stored is None:
            seed = np.random.randint(0, 2**31 - 1, size=2)
            params = self.sample(img.shape[:2], np.random.default_rng(seed))
        elif isinstance(stored, ViewParams):
            params = stored
        else:
            params = ViewParams.from_dict(stored)
        out = self.apply(img, params, results.get('img_path', '<image>'))
        results['img'] = out
        results['img_shape'] = out.shape[:2]
        results[VIEW_PARAMS] = params.to_dict()
        results['flip'] = params.flip
        results['flip_direction'] = \
            self.flip_direction if params.flip else None
        results['scale_factor'] = (self.scale[1] / params.box[2],
                                   self.scale[0] / params.box[3])
        return results

    def __repr__(self) -> str:
        args = ', '.join(f'{k}={v!r}' for k, v in self.config().items()
                         if k != 'type')
        return f'{type(self).__name__}({args})'


# ------------------------------------------------------------------------
# Translating a distillation pipeline into loader + ReplayView + packer.
_LOADERS = ('LoadImageFromFileSafe', 'LoadImageFromFile')
_PACKERS = ('PackImageInputs', )


def _short_type(cfg: Mapping) -> str:
    type_ = cfg.get('type')
    if not isinstance(type_, str):
        raise TeacherCacheError(
            'the teacher cache needs a train pipeline of config dicts with '
            f'string types, got {cfg!r}')
    return type_.rsplit('.', 1)[-1]


def _from_resize(cfg: Mapping) -> dict:
    extra = sorted(set(cfg) - {'type', 'scale', 'keep_ratio',
                               'interpolation', 'backend'})
    if cfg.get('keep_ratio', False) or extra or cfg.get('scale') is None:
        raise TeacherCacheError(
            f'cannot cache views of {dict(cfg)!r}: the cache needs one '
            'output size, i.e. Resize(scale=(w, h), keep_ratio=False) '
            '(only interpolation and backend may be set besides)')
    scale = cfg['scale']
    w, h = (scale, scale) if isinstance(scale, int) else scale
    return dict(scale=[int(h), int(w)],
                interpolation=cfg.get('interpolation', 'bilinear'),
                backend=cfg.get('backend', 'cv2'))


def _from_rrc(cfg: Mapping) -> dict:
    allowed = {'type', 'scale', 'crop_ratio_range', 'aspect_ratio_range',
               'max_attempts', 'interpolation', 'backend'}
    extra = sorted(set(cfg) - allowed)
    if extra:
        raise TeacherCacheError(f'cannot cache views of {dict(cfg)!r}: '
                                f'unsupported options {extra}')
    scale = cfg['scale']
    h, w = (scale, scale) if isinstance(scale, int) else scale
    return dict(scale=[int(h), int(w)],
                crop_ratio_range=list(cfg.get('crop_ratio_range',
                                              (0.08, 1.0))),
                aspect_ratio_range=list(cfg.get('aspect_ratio_range',
                                                (3. / 4., 4. / 3.))),
                max_attempts=int(cfg.get('max_attempts', 10)),
                interpolation=cfg.get('interpolation', 'bilinear'),
                backend=cfg.get('backend', 'cv2'))


def _from_flip(cfg: Mapping) -> dict:
    prob = cfg.get('prob')
    direction = cfg.get('direction', 'horizontal')
    extra = sorted(set(cfg) - {'type', 'prob', 'direction'})
    if extra or not isinstance(prob, (int, float)) or \
            direction not in _DIRECTIONS:
        raise TeacherCacheError(
            f'cannot cache views of {dict(cfg)!r}: the cache replays '
            "RandomFlip(prob=<float>, direction='horizontal' | 'vertical')")
    return dict(flip_prob=float(prob), flip_direction=direction)


def split_pipeline(pipeline: Sequence[Mapping]
                   ) -> tuple[dict, dict, dict]:
    """Translate a distillation train pipeline into replayable parts.

    Supported: a loading transform (``LoadImageFromFileSafe`` /
    ``LoadImageFromFile``), one geometric transform (``mmcv.Resize`` with
    ``keep_ratio=False``, ``mmpretrain.RandomResizedCrop`` or
    ``kiv.ReplayView``), an optional ``RandomFlip`` and
    ``kiv.PackImageInputs``. Anything else (colour jitter, blur, ...) is
    refused: it would make the student's pixels differ from the ones the
    cached targets were computed on.

    Args:
        pipeline (Sequence[dict]): ``train_dataloader.dataset.pipeline``.

    Returns:
        tuple[dict, dict, dict]: the loader config, the ``kiv.ReplayView``
        config and the packer config.

    Raises:
        TeacherCacheError: a transform that cannot be replayed, or a
            missing loader / size / packer.
    """
    loader = pack = None
    view: dict[str, Any] = {}
    geometric = flip = None
    for cfg in pipeline:
        name = _short_type(cfg)
        if name in _LOADERS:
            loader = dict(cfg)
        elif name in _PACKERS:
            pack = dict(cfg)
        elif name in ('Resize', 'RandomResizedCrop', 'ReplayView'):
            if geometric is not None:
                raise TeacherCacheError(
                    f'cannot cache views of a pipeline with two geometric '
                    f'transforms ({geometric} and {name}): use one Resize, '
                    'RandomResizedCrop or kiv.ReplayView')
            geometric = name
            if name == 'Resize':
                view.update(_from_resize(cfg))
            elif name == 'RandomResizedCrop':
                view.update(_from_rrc(cfg))
            else:
                view.update(ReplayView(**{k: v for k, v in cfg.items()
                                          if k != 'type'}).config())
        elif name == 'RandomFlip':
            if flip is not None:
                raise TeacherCacheError('cannot cache views of a pipeline '
                                        'with two RandomFlip transforms')
            flip = _from_flip(cfg)
        else:
            raise TeacherCacheError(
                f'cannot cache views of the train pipeline transform '
                f'{cfg.get("type")!r}: the cache replays crop/resize/flip '
                f'only (a loader, Resize(keep_ratio=False) or '
                f'RandomResizedCrop or kiv.ReplayView, RandomFlip, '
                f'kiv.PackImageInputs); other augmentations would give the '
                f'student other pixels than its cached targets saw')
    missing = [what for what, value in (('a loading transform', loader),
                                        ('a fixed output size (Resize or '
                                         'RandomResizedCrop)', geometric),
                                        ('kiv.PackImageInputs', pack))
               if value is None]
    if missing:
        raise TeacherCacheError('cannot cache views of the train pipeline: '
                                f'it has no {" and no ".join(missing)}')
    if flip is not None:
        if geometric == 'ReplayView':
            raise TeacherCacheError(
                'cannot combine kiv.ReplayView with RandomFlip: set '
                'ReplayView(flip_prob=...) instead')
        view.update(flip)
    view.pop('type', None)
    return loader, ReplayView(**view).config(), pack
