"""Shared fixtures: tiny real-layout datasets, a tiny distillation run and
its data, safe I/O for one test, the demo's package. Plain helpers (the
checkout's paths, the tool runner) are in :mod:`kiv.testing`.

Under pytest-xdist (``make test`` runs two workers) each worker gets its
share of the cores as torch/OpenMP/MKL threads, set here before any test
module imports torch, and the test files with the most slow tests are
handed out first (see :func:`pytest_collection_modifyitems`)."""
from __future__ import annotations

import collections
import os
import os.path as osp
import sys

import pytest


def _xdist_worker_threads() -> int | None:
    """Threads of one pytest-xdist worker: the cores this process may use
    shared out among the workers (1 for 2 workers on 2 cores), or None
    outside xdist (torch's default then)."""
    if not os.environ.get('PYTEST_XDIST_WORKER'):
        return None
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT') or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(
        os, 'sched_getaffinity') else os.cpu_count() or 1  # not on macOS
    return max(1, cores // max(1, workers))


_THREADS = _xdist_worker_threads()
if _THREADS:
    # before torch (or NumPy) is imported: OpenMP and MKL read these once;
    # subprocesses, spawned and forked workers inherit them
    for _var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS',
                 'OPENBLAS_NUM_THREADS'):
        os.environ[_var] = str(_THREADS)
    import torch
    torch.set_num_threads(_THREADS)
    try:
        torch.set_num_interop_threads(_THREADS)
    except RuntimeError:  # only allowed before any inter-op work started
        pass


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, order the test files by their number of tests
    marked ``slow``, most first (a stable sort: a file's tests keep their
    order, and so do files with as many slow tests). With ``--dist
    loadfile --no-loadscope-reorder`` (``make test``) the workers take the
    long files first and end on short ones, not one worker still running
    a long file while the other has nothing left to do. Every worker sorts
    its collection the same way, as xdist requires."""
    if not os.environ.get('PYTEST_XDIST_WORKER'):
        return
    slow = collections.Counter(item.path for item in items
                               if item.get_closest_marker('slow'))
    items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(scope='session')
def kiv_demo():
    """The demo's package ``kiv_demo``, imported as ``tools/demo.py``
    imports it: its project folder (``projects/kiv_demo``, beside kiv, not
    installed with it) goes on ``sys.path``.

    Returns:
        module: ``kiv_demo`` (its modules registered in scope
        ``kiv_demo``).
    """
    from kiv.testing.paths import DEMO_PROJECT
    if DEMO_PROJECT not in sys.path:
        sys.path.insert(0, DEMO_PROJECT)
    import kiv_demo
    return kiv_demo


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
    """A directory holding ``data/{coco,ade,imagenet}`` in the real layouts.

    Tools are run with this directory as the working directory, exactly as
    OpenMMLab configs expect ``data/...`` relative paths.
    """
    from kiv.testing import (make_tiny_ade20k, make_tiny_coco,
                             make_tiny_imagenet)
    root = str(tmp_path_factory.mktemp('tiny'))
    make_tiny_coco(osp.join(root, 'data', 'coco'))
    make_tiny_ade20k(osp.join(root, 'data', 'ade'))
    make_tiny_imagenet(osp.join(root, 'data', 'imagenet'))
    return root


@pytest.fixture(scope='session')
def exported_student(tmp_path_factory) -> dict:
    """A student exported from a real (2-iteration) tiny distillation run.

    Returns:
        dict: ``path`` of the exported checkpoint (``student.pth``), ``root``
        (a directory holding ``data/coco`` and ``data/tiny_teachers``), and
        ``backbone`` (the ``kiv.AdapterViT`` config to use downstream, with
        ``base.checkpoint=None`` and the Pretrained ``init_cfg`` set).
    """
    from mmengine.config import Config
    from mmengine.runner import Runner

    from kiv.apis.export import export_student
    from kiv.testing import make_tiny_coco
    from kiv.testing.paths import TINY_DISTILL_CFG, in_dir
    from kiv.testing.tiny_teachers import create_tiny_teachers
    root = str(tmp_path_factory.mktemp('student'))
    make_tiny_coco(osp.join(root, 'data', 'coco'))
    create_tiny_teachers(osp.join(root, 'data', 'tiny_teachers'))
    cfg = Config.fromfile(TINY_DISTILL_CFG)
    cfg.work_dir = osp.join(root, 'distill')
    cfg.train_cfg.max_iters = 2
    cfg.train_cfg.val_interval = 100
    cfg.default_hooks.checkpoint.interval = 2
    with in_dir(root):
        Runner.from_cfg(cfg).train()
    path = osp.join(root, 'student.pth')
    export_student(osp.join(root, 'distill', 'iter_2.pth'), path)
    backbone = cfg.model.student.to_dict()
    backbone['base']['checkpoint'] = None
    backbone['init_cfg'] = dict(type='Pretrained', checkpoint=path)
    return dict(path=path, root=root, backbone=backbone)


@pytest.fixture
def safe_io():
    """``kiv.enable_safe_io()`` for one test, undone afterwards.

    Importing kiv does not switch it on (``test_safe_io.py`` checks that),
    so tests of mmengine's own loading/saving paths turn it on explicitly,
    as kiv's tools do, and leave the process as they found it.
    """
    import kiv
    newly = kiv.enable_safe_io()
    yield
    if newly:
        kiv.disable_safe_io()


@pytest.fixture(scope='module')
def distill_workdir(tmp_path_factory):
    """Tiny COCO images and tiny teacher checkpoints (the tiny distillation
    config's data), and the cwd for that config while the module runs."""
    from kiv.testing import make_tiny_coco
    from kiv.testing.paths import in_dir
    from kiv.testing.tiny_teachers import create_tiny_teachers
    root = str(tmp_path_factory.mktemp('distill'))
    make_tiny_coco(osp.join(root, 'data', 'coco'), num_train=8, num_val=4)
    create_tiny_teachers(osp.join(root, 'data', 'tiny_teachers'))
    with in_dir(root):
        yield root
