"""tools/train.py, tools/test.py and the torchrun wrappers on tiny mmdet and
mmseg configs with the real dataset layouts (CPU)."""
import os
import os.path as osp
import pickle
import sys

import pytest

from kiv.testing.paths import REPO
from kiv.testing.paths import TEST_DET_CFG as DET_CFG
from kiv.testing.paths import TEST_SEG_CFG as SEG_CFG
from kiv.testing.tools import run_tool


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def det_run(data_dir):
    """Train the tiny Mask R-CNN 2 iterations; the work dir is reused."""
    work = osp.join(data_dir, 'work_det')
    out = _ok(run_tool(['train.py', DET_CFG, '--work-dir', work], data_dir))
    return work, out


@pytest.mark.slow
def test_train_mmdet_and_resume(det_run, data_dir):
    work, out = det_run
    assert osp.isfile(osp.join(work, 'iter_2.pth'))
    assert 'Iter(train) [2/2]' in out
    # resume (latest checkpoint) continues to iteration 3
    out = _ok(run_tool(['train.py', DET_CFG, '--work-dir', work, '--resume',
                        '--cfg-options', 'train_cfg.max_iters=3'], data_dir))
    assert 'resumed epoch: 0, iter: 2' in out
    assert 'Iter(train) [3/3]' in out
    assert osp.isfile(osp.join(work, 'iter_3.pth'))


@pytest.mark.slow
def test_test_mmdet_out_and_summary(det_run, data_dir):
    work, _ = det_run
    preds = osp.join(work, 'preds.pkl')
    out = _ok(run_tool(['test.py', DET_CFG, osp.join(work, 'iter_2.pth'),
                        '--work-dir', work, '--out', preds], data_dir))
    assert '| detection | CocoDataset | coco/bbox_mAP |' in out
    assert '| detection | CocoDataset | coco/segm_mAP |' in out
    with open(preds, 'rb') as f:
        results = pickle.load(f)  # our own file, written by this test
    assert len(results) == 2 and 'pred_instances' in results[0]


@pytest.mark.slow
def test_train_test_mmseg_with_show_dir(data_dir):
    work = osp.join(data_dir, 'work_seg')
    _ok(run_tool(['train.py', SEG_CFG, '--work-dir', work], data_dir))
    vis = osp.join(data_dir, 'vis_seg')
    out = _ok(run_tool(['test.py', SEG_CFG, osp.join(work, 'iter_2.pth'),
                        '--work-dir', work, '--show-dir', vis], data_dir))
    assert '| segmentation | ADE20KDataset | mIoU |' in out
    pngs = [f for _, _, fs in os.walk(vis) for f in fs if f.endswith('.png')]
    assert len(pngs) == 2


@pytest.mark.slow
def test_missing_config_and_checkpoint_fail_in_one_line(data_dir):
    proc = run_tool(['train.py', 'configs/nope.py'], data_dir)
    assert proc.returncode != 0
    assert proc.stderr.strip() == 'error: config file not found: ' \
        'configs/nope.py'
    proc = run_tool(['test.py', SEG_CFG, 'nope.pth'], data_dir)
    assert proc.returncode != 0
    assert proc.stderr.strip() == 'error: checkpoint not found: nope.pth'
    proc = run_tool(['train.py', SEG_CFG, '--resume', 'gone.pth'], data_dir)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == \
        'error: resume checkpoint not found: gone.pth'


@pytest.mark.slow
def test_dist_train_two_cpu_processes(data_dir):
    """tools/dist_train.sh (torchrun) with 2 processes over gloo."""
    work = osp.join(data_dir, 'work_dist')
    env_python = dict(os.environ, PYTHON=sys.executable)
    import subprocess
    proc = subprocess.run(
        ['bash', osp.join(REPO, 'tools', 'dist_train.sh'), DET_CFG, '2',
         '--work-dir', work],
        cwd=data_dir, env=dict(env_python, PYTHONWARNINGS='ignore',
                               OMP_NUM_THREADS='1',
                               PORT=str(29500 + os.getpid() % 1000)),
        capture_output=True, text=True, timeout=600)
    out = _ok(proc)
    assert 'Distributed training: True' in out
    assert "type='kiv.CPUDistributedDataParallel'" in out
    assert 'Iter(train) [2/2]' in out
    assert osp.isfile(osp.join(work, 'iter_2.pth'))
