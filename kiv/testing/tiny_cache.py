"""The tiny teacher-feature cache the cache tests share: its sizes, the
directory it is written from and the config it belongs to (the tiny
distillation config)."""
from __future__ import annotations

import os.path as osp

#: views per image, images per shard and training images of the shared cache
VIEWS, SHARD_SIZE, NUM_IMAGES = 2, 3, 8


def make_cache_root(root: str) -> str:
    """Write ``root/data/coco`` (:data:`NUM_IMAGES` train images, 2 val)
    and ``root/data/tiny_teachers``: the tiny distillation config's data.

    Returns:
        str: ``root``.
    """
    from .tiny_datasets import make_tiny_coco
    from .tiny_teachers import create_tiny_teachers
    make_tiny_coco(osp.join(root, 'data', 'coco'), num_train=NUM_IMAGES,
                   num_val=2)
    create_tiny_teachers(osp.join(root, 'data', 'tiny_teachers'))
    return root


def tiny_cfg():
    """The tiny distillation config (a fresh copy)."""
    from mmengine.config import Config

    from .paths import TINY_DISTILL_CFG
    return Config.fromfile(TINY_DISTILL_CFG)
