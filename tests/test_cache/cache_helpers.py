"""Helpers of the teacher-feature cache tests (paths, the tiny config, the
sizes of the shared cache); the fixtures are in ``cache_fixtures.py``."""
from __future__ import annotations

import contextlib
import os
import os.path as osp
from collections.abc import Iterator

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TINY_DISTILL_CFG = osp.join(
    REPO, 'configs', 'distill',
    'kiv_adapter-vit-t14-reg4_1xb4-20it_tiny-coco-images.py')
#: the cache written by the ``cache`` fixture
VIEWS, SHARD_SIZE, NUM_IMAGES = 2, 3, 8


@contextlib.contextmanager
def in_dir(path: str) -> Iterator[None]:
    """Run with ``path`` as the working directory (configs use data/...)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def make_root(root: str) -> str:
    """Write ``data/coco`` (8 train images) and ``data/tiny_teachers``."""
    from kiv.testing import make_tiny_coco
    from kiv.testing.tiny_teachers import create_tiny_teachers
    make_tiny_coco(osp.join(root, 'data', 'coco'), num_train=NUM_IMAGES,
                   num_val=2)
    create_tiny_teachers(osp.join(root, 'data', 'tiny_teachers'))
    return root


def tiny_cfg():
    """The tiny distillation config (a fresh copy)."""
    from mmengine.config import Config
    return Config.fromfile(TINY_DISTILL_CFG)
