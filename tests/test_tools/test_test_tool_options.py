"""tools/test.py benchmarking options: ``--data-root``, dataset checks
before the Runner is built, and the summary table."""
import os.path as osp
import re
import shutil

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import kiv  # noqa: F401  registers kiv.*
from kiv.apis.data_root import check_dataset, set_data_root
from kiv.apis.summary import format_summary_table
from kiv.testing.paths import REPO
from kiv.testing.paths import TEST_DET_CFG as DET_CFG
from kiv.testing.paths import TEST_SEG_CFG as SEG_CFG
from kiv.testing.tools import run_tool

CLS_CFG = osp.join(
    REPO, 'configs', 'mmpretrain',
    'kiv-adapter-vit-t14_linear-probe_1xb4-coslr-2e_tiny-in1k.py')


@pytest.fixture(scope='module')
def seg_checkpoint(tmp_path_factory) -> str:
    """Weights of the tiny FPN-R18 segmentor (random init, saved as a
    state dict), so tools/test.py has something to evaluate."""
    from mmseg.registry import MODELS
    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(SEG_CFG).model)
    path = str(tmp_path_factory.mktemp('seg') / 'fpn.pth')
    torch.save(dict(state_dict=model.state_dict()), path)
    return path


def _fails_in_one_line(proc, path: str) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f'error: dataset not found: {path} ('), \
        lines[0]
    return lines[0]


@pytest.mark.slow
def test_data_root_moves_the_test_run(data_dir, seg_checkpoint, tmp_path):
    """Data moved elsewhere: the config's relative path fails with one
    line; --data-root points the run at the new place."""
    moved = tmp_path / 'datasets' / 'ADEChallengeData2016'
    shutil.copytree(osp.join(data_dir, 'data', 'ade', 'ADEChallengeData2016'),
                    moved)
    cwd = tmp_path / 'elsewhere'  # no data/ here
    cwd.mkdir()
    proc = run_tool(['test.py', SEG_CFG, seg_checkpoint], str(cwd))
    line = _fails_in_one_line(
        proc, 'data/ade/ADEChallengeData2016/images/validation')
    assert 'ADE20K layout' in line and '--data-root' in line

    proc = run_tool(['test.py', SEG_CFG, seg_checkpoint, '--data-root',
                     str(moved), '--work-dir', str(tmp_path / 'work')],
                    str(cwd))
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r'^\| segmentation \| ADE20KDataset \| mIoU \| '
                      r'([\d.]+) \| ' + re.escape(seg_checkpoint) + r' \|$',
                      proc.stdout, re.MULTILINE)
    assert match and 0.0 <= float(match.group(1)) <= 100.0


@pytest.mark.slow
def test_missing_coco_annotation_file_fails_in_one_line(data_dir, tmp_path):
    coco = tmp_path / 'coco'
    shutil.copytree(osp.join(data_dir, 'data', 'coco'), coco)
    (coco / 'annotations' / 'instances_val2017.json').unlink()
    ckpt = tmp_path / 'any.pth'  # checked before the Runner loads it
    ckpt.write_bytes(b'')
    proc = run_tool(['test.py', DET_CFG, str(ckpt), '--data-root',
                     str(coco) + '/'], data_dir)
    line = _fails_in_one_line(
        proc, osp.join(str(coco), 'annotations', 'instances_val2017.json'))
    assert 'COCO 2017 layout' in line


def test_set_data_root_rewrites_coco_dataset_and_evaluator(data_dir,
                                                           capsys):
    cfg = Config.fromfile(DET_CFG)
    coco = osp.join(data_dir, 'data', 'coco')
    set_data_root(cfg, coco)
    assert cfg.test_dataloader.dataset.data_root == coco
    assert cfg.test_evaluator.ann_file == osp.join(
        coco, 'annotations', 'instances_val2017.json')
    assert cfg.test_dataloader.dataset.ann_file == \
        'annotations/instances_val2017.json'
    check_dataset(cfg)  # the tiny COCO is complete: no exit

    # evaluator lists and a data root without trailing slash
    cfg = Config.fromfile(DET_CFG)
    cfg.test_evaluator = [cfg.test_evaluator, dict(type='DumpResults')]
    set_data_root(cfg, '/mnt/coco')
    assert cfg.test_evaluator[0].ann_file == \
        '/mnt/coco/annotations/instances_val2017.json'
    with pytest.raises(SystemExit):
        check_dataset(cfg)
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: dataset not found: '
                          '/mnt/coco/annotations/instances_val2017.json (')


def test_imagenet_split_folder_is_checked(data_dir, capsys):
    cfg = Config.fromfile(CLS_CFG)
    set_data_root(cfg, osp.join(data_dir, 'data', 'imagenet'))
    check_dataset(cfg)
    set_data_root(cfg, '/mnt/imagenet')
    with pytest.raises(SystemExit):
        check_dataset(cfg)
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: dataset not found: /mnt/imagenet/val (')
    assert 'ImageNet layout' in err and err.count('\n') == 0


def test_wrapped_datasets_are_checked(data_dir, capsys):
    cfg = Config.fromfile(SEG_CFG)
    inner = cfg.test_dataloader.dataset
    inner.data_root = osp.join(data_dir, inner.data_root)
    missing = inner.copy()
    missing.data_prefix = dict(img_path='images/nope',
                               seg_map_path='annotations/validation')
    cfg.test_dataloader.dataset = dict(type='ConcatDataset',
                                       datasets=[inner, missing])
    with pytest.raises(SystemExit):
        check_dataset(cfg)
    assert osp.join(inner.data_root, 'images/nope') in capsys.readouterr().err


def test_summary_table_rows():
    seg = format_summary_table(
        'mmseg', 'ADE20KDataset',
        dict(aAcc=np.float32(91.5), mIoU=np.float32(47.25)), 'a.pth')
    assert '| segmentation | ADE20KDataset | mIoU | 47.2500 | a.pth |' in seg
    cls = format_summary_table(
        'mmpretrain', 'ImageNet', {
            'accuracy/top1': 81.5,
            'accuracy/top5': torch.tensor(95.25),
            'per_class': [1.0, 2.0]
        }, 'b.pth')
    rows = cls.splitlines()
    assert rows[0] == '| task | dataset | metric | value | checkpoint |'
    assert rows[2:] == [
        '| classification | ImageNet | accuracy/top1 | 81.5000 | b.pth |',
        '| classification | ImageNet | accuracy/top5 | 95.2500 | b.pth |',
    ]
