"""Shared fixtures: tiny real-layout datasets and a tool runner."""
from __future__ import annotations

import os
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(REPO, 'tests', 'data', 'configs')


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


def run_tool(args: list[str], cwd: str, timeout: int = 600,
             launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python tools/<args>`` (or a launcher command) in ``cwd``.

    Args:
        args: tool script (relative to ``tools/``) and its arguments.
        cwd: working directory.
        timeout: seconds.
        launcher: a command prefix replacing ``[python]`` (e.g. torchrun).

    Returns:
        CompletedProcess with text stdout/stderr.
    """
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS='ignore',
               OMP_NUM_THREADS='1')
    script = osp.join(REPO, 'tools', args[0])
    cmd = (launcher or [sys.executable]) + [script] + args[1:]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
