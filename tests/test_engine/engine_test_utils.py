"""Helpers of the engine tests: subprocess runs, toy configs, evil files.

The toy model, dataset and metric the configs name live in
``toy_engine_modules.py`` next to this file; :func:`run_python` puts this
folder on ``PYTHONPATH`` so ``custom_imports`` finds them.
"""
import os
import os.path as osp
import subprocess
import sys

import torch
from mmengine.config import Config

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(osp.dirname(HERE))


def run_python(args, cwd, timeout=300):
    """Run python with the repo and this folder (toy modules) importable."""
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([REPO, HERE]),
               PYTHONWARNINGS='ignore',
               OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


class _Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def evil_checkpoint(tmp_path):
    marker = tmp_path / 'pwned'
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {'w': torch.zeros(1)},
                'meta': _Evil(str(marker))}, path)
    return path, marker


def toy_config(path, imports=('toy_engine_modules', 'kiv'), **overrides):
    """Write a tiny mmengine config (toy model/data/metric) to ``path``."""
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
