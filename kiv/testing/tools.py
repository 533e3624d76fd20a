"""Run kiv's tools and Python snippets in a subprocess, as a user would
(the checkout importable, warnings off, one OpenMP thread), and write the
toy config such runs train and test."""
from __future__ import annotations

import os
import os.path as osp
import subprocess
import sys

from .paths import REPO

#: the module of the toy model, dataset and metric :func:`toy_config` names
TOY_MODULES = 'kiv.testing.toy_engine'


def tool_env() -> dict[str, str]:
    """The environment of a tool run: this process's, with the checkout on
    ``PYTHONPATH``, ``PYTHONWARNINGS=ignore`` and ``OMP_NUM_THREADS=1``."""
    return dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS='ignore',
                OMP_NUM_THREADS='1')


def run_python(args: list[str], cwd: str, timeout: int = 300,
               launcher: list[str] | None = None
               ) -> subprocess.CompletedProcess:
    """Run ``python <args>`` (or ``<launcher> <args>``) in ``cwd``.

    Args:
        args: the interpreter's arguments (a script and its arguments, or
            ``['-c', code]``).
        cwd: working directory.
        timeout: seconds.
        launcher: a command prefix replacing ``[python]`` (e.g. torchrun).

    Returns:
        CompletedProcess with text stdout/stderr.
    """
    cmd = (launcher or [sys.executable]) + list(args)
    return subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True,
                          text=True, timeout=timeout)


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
    script = osp.join(REPO, 'tools', args[0])
    return run_python([script] + list(args[1:]), cwd, timeout=timeout,
                      launcher=launcher)


def toy_config(path, imports=(TOY_MODULES, 'kiv'), **overrides) -> str:
    """Write a tiny mmengine config (toy model/data/metric) to ``path``.

    Args:
        path: the config file to write.
        imports: its ``custom_imports``.
        **overrides: top-level config keys replacing the defaults.

    Returns:
        str: ``path``.
    """
    from mmengine.config import Config
    loader = dict(batch_size=2,
                  num_workers=0,
                  dataset=dict(type='ToyData'),
                  sampler=dict(type='DefaultSampler', shuffle=False),
                  collate_fn=dict(type='default_collate'))
    cfg = dict(
        custom_imports=dict(imports=list(imports),
                            allow_failed_imports=False),
        model=dict(type='ToyNet'),
        train_dataloader=loader,
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        train_cfg=dict(by_epoch=False, max_iters=4),
        test_dataloader=loader,
        test_evaluator=dict(type='ToyMetric'),
        test_cfg=dict(),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           interval=2,
                                           by_epoch=False)),
        log_level='INFO')
    cfg.update(overrides)
    Config(cfg).dump(str(path))
    return str(path)
