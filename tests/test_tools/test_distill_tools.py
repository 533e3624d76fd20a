"""The whole workflow through the command-line tools: the tiny
distillation config trains on CPU and logs per-teacher losses and gradient
shares; the exported student loads with weights_only=True."""
import os.path as osp

import pytest
import torch

from kiv.testing.paths import TINY_DISTILL_CFG
from kiv.testing.tools import run_tool


@pytest.mark.slow
def test_train_tiny_distillation_then_export(tmp_path):
    from kiv.testing import make_tiny_coco
    from kiv.testing.tiny_teachers import create_tiny_teachers
    root = str(tmp_path)
    make_tiny_coco(osp.join(root, 'data', 'coco'), num_train=8, num_val=2)
    create_tiny_teachers(osp.join(root, 'data', 'tiny_teachers'))
    proc = run_tool(['train.py', TINY_DISTILL_CFG, '--work-dir', 'run',
                     '--cfg-options', 'train_cfg.max_iters=5',
                     'train_cfg.val_interval=5',
                     'default_hooks.checkpoint.interval=5'], root)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert 'Iter(train) [5/5]' in out
    for teacher in ('dinov2', 'clip', 'detector'):
        assert f'loss_{teacher}_features' in out
        assert f'grad_share/{teacher}' in out
        assert f'agreement/{teacher}/level0_cos' in out
    for teacher in ('dinov2', 'clip'):  # the detector is dense only
        assert f'loss_{teacher}_summary' in out
        assert f'agreement/{teacher}/summary_cos' in out
    assert 'loss_detector_summary' not in out
    assert 'StatisticsWarmupHook: fixed the statistics' in out

    proc = run_tool(['export_student.py', 'run/iter_5.pth', 'student.pth'],
                    root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(osp.join(root, 'student.pth'), weights_only=True)
    assert ckpt['meta']['base_teacher'] == 'dinov2'
    assert any(k.startswith('base.model.') for k in ckpt['state_dict'])
    assert not any(k.startswith(('teachers.', 'latent.'))
                   for k in ckpt['state_dict'])

    proc = run_tool(['export_student.py', 'run/nope.pth', 'x.pth'], root)
    assert proc.returncode != 0
    assert 'checkpoint not found: run/nope.pth' in proc.stderr
