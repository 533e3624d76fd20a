"""Paths of the kiv source checkout the tests run from, and a working
directory switch.

The tests need the checkout itself (``configs/``, ``tools/``,
``tests/data/``), not only the installed package, and some need its paths
at collection time (parametrised over config files), where pytest fixtures
cannot reach; so the paths are importable module constants. kiv may be
installed non-editable, so the checkout is not assumed to hold this file:
it is ``KIV_REPO`` if set, else the checkout this file is in (editable
install, ``PYTHONPATH``, ``python -m pytest`` from the checkout), else the
checkout holding the working directory; anything else is an error that says
so.
"""
from __future__ import annotations

import contextlib
import os
import os.path as osp
from collections.abc import Iterator

#: entries that tell a kiv source checkout from any other directory
_CHECKOUT_ENTRIES = ('setup.py', 'configs', 'tools', 'tests')


def _is_checkout(path: str) -> bool:
    return all(osp.exists(osp.join(path, e)) for e in _CHECKOUT_ENTRIES)


def find_repo() -> str:
    """The kiv source checkout (see the module docstring for the order).

    Raises:
        RuntimeError: no checkout was found, or ``KIV_REPO`` is not one.
    """
    given = os.environ.get('KIV_REPO')
    if given:
        if not _is_checkout(given):
            raise RuntimeError(f'KIV_REPO={given} is not a kiv source '
                               f'checkout (needs {_CHECKOUT_ENTRIES})')
        return osp.abspath(given)
    here = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    if _is_checkout(here):
        return here
    path = osp.abspath(os.getcwd())
    while True:
        if _is_checkout(path):
            return path
        parent = osp.dirname(path)
        if parent == path:
            break
        path = parent
    raise RuntimeError(
        'kiv.testing needs the kiv source checkout (configs/, tools/, '
        f'tests/); kiv is imported from {osp.dirname(here)} and the working '
        'directory is not in a checkout: run the tests from the checkout or '
        'set KIV_REPO=/path/to/checkout')


#: the kiv source checkout
REPO = find_repo()
#: the small upstream-stack configs the tool tests run (tests/data/configs)
TEST_CONFIGS = osp.join(REPO, 'tests', 'data', 'configs')
#: an mmdet Mask R-CNN (ResNet-18) and an mmseg FPN of those
TEST_DET_CFG = osp.join(TEST_CONFIGS,
                        'mask-rcnn_r18_fpn_1xb1-2it_tiny-coco.py')
TEST_SEG_CFG = osp.join(TEST_CONFIGS, 'fpn_r18_1xb1-2it_tiny-ade20k-64x64.py')
#: the tiny distillation config (tiny student and teachers, tiny COCO)
TINY_DISTILL_CFG = osp.join(
    REPO, 'configs', 'distill',
    'kiv_adapter-vit-t14-reg4_1xb4-20it_tiny-coco-images.py')
#: the real-scale distillation recipe (DINOv2, CLIP, SAM, Mask R-CNN)
REAL_DISTILL_CFG = osp.join(
    REPO, 'configs', 'distill',
    'kiv_adapter-vit-b14-reg4_dinov2-clip-sam-maskrcnn_8xb64-100k_in1k.py')
#: the demo's project folder (its package ``kiv_demo`` and ``configs/``),
#: beside kiv and not part of it: the ``kiv_demo`` fixture of
#: ``tests/conftest.py`` puts it on ``sys.path`` as ``tools/demo.py`` does
DEMO_PROJECT = osp.join(REPO, 'projects', 'kiv_demo')


@contextlib.contextmanager
def in_dir(path: str) -> Iterator[str]:
    """Run the block with ``path`` as the working directory, then go back
    (configs name their data as ``data/...`` relative paths).

    Yields:
        str: ``path``.
    """
    old = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)
