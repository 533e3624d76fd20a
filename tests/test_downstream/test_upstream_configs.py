"""kiv.AdapterViT as a drop-in backbone of unmodified upstream configs.

Each test reads an upstream config from the installed toolbox
(``mmdet::``, ``mmseg::``, ``mmpretrain::``), changes only

- ``model.backbone`` (the tiny student exported by a real tiny
  distillation run, ``exported_student``), plus ``model.pretrained`` where
  mmseg keeps a ResNet there;
- the channel count of what reads the backbone (the first neck, or the
  decode / auxiliary / classification head);
- the data: the tiny COCO / ADE20K / ImageNet layouts under ``data/`` with
  the dataset's own classes (the upstream heads keep 80 / 150 / 1000
  classes), image scales shrunk by one factor so CPU runs take seconds, no
  dataloader workers;
- the schedule length (a few iterations, no validation during training);
- detectors' test ``score_thr`` (0 instead of 0.05): the scores of a
  detector trained for two iterations are below the upstream threshold, and
  the metric should see predictions,

checks that nothing else differs from the upstream config, then trains and
tests through ``tools/train.py`` and ``tools/test.py``. No config asks for
``pad_size_divisor=14`` or 518-px crops: the inputs (50x50 detection
batches padded to 64, DETR batches of any size, 64-px segmentation crops,
45-px classification crops) are not multiples of the patch size 14, and
the backbone pads inside.
"""
from __future__ import annotations

import json
import os
import os.path as osp
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.hub import get_config

from kiv.testing.paths import REPO
from kiv.utils.checkpoint import safe_torch_load
from kiv.models.backbones import AdapterViT

#: For each ``[name, config, work dir]`` of its JSON argument: runs
#: tools/train.py, then tools/test.py on the checkpoint it saved. One
#: interpreter per toolbox saves a start-up of the whole stack per family;
#: every family is framed by markers, and a failing one does not stop the
#: others.
DRIVER = '''
import json, runpy, sys, traceback
tools, runs = sys.argv[1], json.loads(sys.argv[2])
for name, config, work in runs:
    print(f'@@ START {name}', flush=True)
    try:
        sys.argv = ['train.py', config, '--work-dir', work]
        runpy.run_path(tools + '/train.py', run_name='__main__')
        with open(work + '/last_checkpoint') as f:
            checkpoint = f.read().strip()
        print(f'@@ TRAINED {checkpoint}', flush=True)
        sys.argv = ['test.py', config, checkpoint, '--work-dir', work]
        runpy.run_path(tools + '/test.py', run_name='__main__')
        print(f'@@ OK {name}', flush=True)
    except BaseException:
        traceback.print_exc()
        print(f'@@ FAILED {name}', flush=True)
'''
TOOLS = osp.join(REPO, 'tools')

#: image scales of the upstream pipelines are multiplied by these
SHRINK = {'mmdet': 1 / 16, 'mmseg': 1 / 8, 'mmpretrain': 1 / 5}
#: pipeline keys holding image sizes
SIZE_KEYS = ('scale', 'scales', 'crop_size')
#: the summary row tools/test.py prints, per toolbox
SUMMARY = {
    'mmdet': ('detection', 'CocoDataset', 'coco/bbox_mAP'),
    'mmseg': ('segmentation', 'ADE20KDataset', 'mIoU'),
    'mmpretrain': ('classification', 'ImageNet', 'accuracy/top1'),
}
#: what the tests may change besides the family's channel keys
ALLOWED = [
    r'model\.backbone\..*', r'model\.pretrained', r'custom_imports\..*',
    r'(train|val|test)_dataloader\.(num_workers|persistent_workers)',
    r'(train|val|test)_dataloader\.dataset\.(.+\.)?pipeline\..*\.'
    r'(scale|scales|crop_size)(\.\d+)*',
    r'model\.data_preprocessor\.size\.\d',
    r'train_cfg\.(max_epochs|max_iters|val_begin)',
    r'model\.test_cfg\.(.+\.)?score_thr',
]


@dataclass(frozen=True)
class Family:
    """One upstream config and what reads the backbone in it."""
    #: ``<toolbox>::<path>``
    config: str
    #: config key -> number of backbone maps it reads (0: a single int)
    channels: dict[str, int]
    #: extra backbone arguments (which outputs the config reads)
    backbone: dict[str, Any] = field(default_factory=dict)
    #: set ``model.pretrained`` to the student (mmseg's convention) instead
    #: of ``backbone.init_cfg``; ``None``: leave ``model.pretrained`` alone
    model_pretrained: bool | None = None

    @property
    def scope(self) -> str:
        return self.config.split('::')[0]


FAMILIES = {
    # single-stage detector: FPN from level 1 with P6/P7 on the input
    'retinanet': Family(
        'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
        {'model.neck.in_channels': 4}),
    # two-stage cascade with masks; its backbone comes out of the RetinaNet
    # checkpoint above (init_cfg prefix='backbone.')
    'cascade-mask-rcnn': Family(
        'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py',
        {'model.neck.in_channels': 4}),
    # query-based: Deformable DETR (multi-scale deformable attention, 300
    # queries, Hungarian matching), strides 8/16/32 + an extra level, batches
    # padded to the largest image only. (DINO's two-stage query selection
    # needs at least 900 encoder tokens, i.e. images of about 240 px.)
    'deformable-detr': Family(
        'mmdet::deformable_detr/deformable-detr_r50_16xb2-50e_coco.py',
        {'model.neck.in_channels': 3}, dict(out_indices=(1, 2, 3))),
    # PPM + FPN decode head; weights through mmseg's model.pretrained
    'upernet': Family(
        'mmseg::upernet/upernet_r50_4xb4-80k_ade20k-512x512.py',
        {'model.decode_head.in_channels': 4,
         'model.auxiliary_head.in_channels': 0},
        model_pretrained=True),
    # dilated ASPP on the last level + the stride-4 level as low-level skip
    'deeplabv3plus': Family(
        'mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb4-80k_ade20k-512x512'
        '.py',
        {'model.decode_head.in_channels': 0,
         'model.decode_head.c1_in_channels': 0,
         'model.auxiliary_head.in_channels': 0},
        model_pretrained=False),
    # all-MLP head over the four levels
    'segformer': Family(
        'mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py',
        {'model.decode_head.in_channels': 4}),
    # the summary vector into ViT's pre-logits + linear head
    'vit-cls-head': Family(
        'mmpretrain::vision_transformer/vit-base-p16_64xb64_in1k.py',
        {'model.head.in_channels': 0}, dict(out_type='global')),
    # the stride-32 map into global average pooling + linear head
    'resnet-linear-head': Family(
        'mmpretrain::resnet/resnet50_8xb32_in1k.py',
        {'model.head.in_channels': 0}, dict(out_indices=(3, ))),
}


# ----------------------------------------------------------------------
# data
@pytest.fixture(scope='module')
def upstream_data(tmp_path_factory) -> str:
    """``data/{coco,ade,imagenet}`` in the real layouts with the datasets'
    own class names: COCO's json lists all 80 categories (objects are
    persons and bicycles), ADE20K labels are wall and building, ImageNet
    labels index its 1000 classes."""
    from mmdet.datasets import CocoDataset

    from kiv.testing import (make_tiny_ade20k, make_tiny_coco,
                             make_tiny_imagenet)
    root = str(tmp_path_factory.mktemp('upstream'))
    coco = osp.join(root, 'data', 'coco')
    make_tiny_coco(coco, classes=CocoDataset.METAINFO['classes'][:2])
    for split in ('train', 'val'):
        path = osp.join(coco, 'annotations', f'instances_{split}2017.json')
        with open(path) as f:
            ann = json.load(f)
        ann['categories'] = [
            dict(id=i + 1, name=name)
            for i, name in enumerate(CocoDataset.METAINFO['classes'])]
        with open(path, 'w') as f:
            json.dump(ann, f)
    make_tiny_ade20k(osp.join(root, 'data', 'ade'))
    make_tiny_imagenet(osp.join(root, 'data', 'imagenet'))
    return root


# ----------------------------------------------------------------------
# config edits
def _shrink(node: Any, factor: float) -> None:
    """Scale the image sizes of every transform in a pipeline tree."""

    def scaled(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(scaled(v) for v in value)
        return max(1, round(value * factor))

    if isinstance(node, (list, tuple)):
        for item in node:
            _shrink(item, factor)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in SIZE_KEYS and 'type' in node:
                node[key] = scaled(value)
            else:
                _shrink(value, factor)


def _keep_all_scores(node: Any) -> None:
    """``score_thr = 0`` in every part of a detector's ``test_cfg``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'score_thr':
                node[key] = 0.0
            else:
                _keep_all_scores(value)


def _set(cfg: Config, key: str, value: Any) -> None:
    *parents, last = key.split('.')
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value


def swap_backbone(family: Family, student: dict,
                  init_cfg: dict | None = None) -> tuple[Config, Config]:
    """The upstream config and its copy with the tiny student as backbone
    and the tiny data.

    Args:
        family (Family): the config and its channel keys.
        student (dict): ``exported_student``.
        init_cfg (dict, optional): the backbone's ``init_cfg`` (default: the
            exported student file).

    Returns:
        tuple[Config, Config]: upstream, changed.
    """
    upstream = get_config(family.config)
    cfg = get_config(family.config)
    width = student['backbone']['base']['model_kwargs']['embed_dim']
    backbone = dict(student['backbone'], **family.backbone)
    backbone['init_cfg'] = init_cfg or dict(type='Pretrained',
                                            checkpoint=student['path'])
    if family.model_pretrained is True:  # mmseg: model.pretrained
        cfg.model.pretrained = student['path']
        backbone['init_cfg'] = None
    elif family.model_pretrained is False:
        cfg.model.pretrained = None
    cfg.model.backbone = ConfigDict(backbone)
    for key, maps in family.channels.items():
        _set(cfg, key, [width] * maps if maps else width)
    cfg.custom_imports = dict(imports=['kiv'], allow_failed_imports=False)

    factor = SHRINK[family.scope]
    for split in ('train', 'val', 'test'):
        loader = cfg[f'{split}_dataloader']
        loader.num_workers = 0
        loader.persistent_workers = False
        _shrink(loader.dataset, factor)
    if family.scope == 'mmdet':
        _keep_all_scores(cfg.model.test_cfg)
    size = cfg.model.get('data_preprocessor', {}).get('size')
    if size is not None:
        cfg.model.data_preprocessor.size = tuple(
            round(s * factor) for s in size)
    if cfg.train_cfg.get('by_epoch', cfg.train_cfg.get('type') !=
                         'IterBasedTrainLoop'):
        cfg.train_cfg.max_epochs = 1 if family.scope == 'mmdet' else 2
        cfg.train_cfg.val_begin = cfg.train_cfg.max_epochs + 1
    else:
        cfg.train_cfg.max_iters = 2
        cfg.train_cfg.val_begin = 3
    return upstream, cfg


def _flat(obj: Any, prefix: str = '') -> dict[str, Any]:
    """Nested dicts/lists -> ``{'a.b.0.c': value}`` (no ``_scope_``)."""
    if isinstance(obj, dict):
        pairs = [(k, v) for k, v in obj.items() if k != '_scope_']
    elif isinstance(obj, (list, tuple)):
        pairs = list(enumerate(obj))
    else:
        return {prefix[:-1]: obj}
    items: dict[str, Any] = {}
    for k, v in pairs:
        items.update(_flat(v, f'{prefix}{k}.'))
    return items


def assert_only_backbone_and_data_changed(upstream: Config, cfg: Config,
                                          family: Family) -> None:
    a, b = _flat(upstream.to_dict()), _flat(cfg.to_dict())
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    allowed = ALLOWED + [re.escape(k) + r'(\.\d+)?' for k in family.channels]
    unexpected = [k for k in changed
                  if not any(re.fullmatch(p, k) for p in allowed)]
    assert not unexpected, unexpected
    assert any(k.startswith('model.backbone.') for k in changed)


# ----------------------------------------------------------------------
# running the tools
#: the families each toolbox's interpreter runs, in order (the cascade
#: starts from the RetinaNet checkpoint)
GROUPS = {
    'mmdet': ('retinanet', 'cascade-mask-rcnn', 'deformable-detr'),
    'mmseg': ('upernet', 'deeplabv3plus', 'segformer'),
    'mmpretrain': ('vit-cls-head', 'resnet-linear-head'),
}


@dataclass
class Run:
    """One family through the tools."""
    upstream: Config
    cfg: Config
    #: what the family printed (logs, summary table, traceback)
    out: str
    #: the checkpoint tools/train.py saved ('' if training failed)
    checkpoint: str
    ok: bool


def _work(root: str, name: str) -> str:
    return osp.join(root, f'work_{name}')


def _configs(name: str, student: dict, root: str) -> tuple[Config, Config]:
    family = FAMILIES[name]
    if name == 'cascade-mask-rcnn':
        det = osp.join(_work(root, 'retinanet'), 'epoch_1.pth')
        return swap_backbone(family, student, init_cfg=dict(
            type='Pretrained', checkpoint=det, prefix='backbone.'))
    return swap_backbone(family, student)


def run_group(scope: str, student: dict, root: str) -> dict[str, Run]:
    """Train and test every family of a toolbox in one interpreter.

    Returns:
        dict[str, Run]: per family.
    """
    runs, configs = [], {}
    for name in GROUPS[scope]:
        configs[name] = _configs(name, student, root)
        path = osp.join(root, f'{name}.py')
        configs[name][1].dump(path)
        runs.append([name, path, _work(root, name)])
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS='ignore',
               OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-c', DRIVER, TOOLS, json.dumps(runs)], cwd=root,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=900)
    results = {}
    for name in GROUPS[scope]:
        match = re.search(rf'^@@ START {re.escape(name)}$(.*?)'
                          rf'^@@ (OK|FAILED) {re.escape(name)}$',
                          proc.stdout, re.MULTILINE | re.DOTALL)
        out = match.group(1) if match else proc.stdout[-4000:]
        trained = re.search(r'^@@ TRAINED (\S+)$', out, re.MULTILINE)
        results[name] = Run(*configs[name], out,
                            trained.group(1) if trained else '',
                            bool(match) and match.group(2) == 'OK')
    return results


@pytest.fixture(scope='module')
def runs(upstream_data, exported_student):
    """``runs(name)``: the family's :class:`Run`; its toolbox's families
    run once, on first request."""
    done: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in done:
            scope = FAMILIES[name].scope
            done.update(run_group(scope, exported_student, upstream_data))
        return done[name]

    return get


def _summary_value(out: str, scope: str) -> float:
    task, dataset, metric = SUMMARY[scope]
    match = re.search(
        rf'^\| {task} \| {dataset} \| {re.escape(metric)} \| ([-\d.]+) \|',
        out, re.MULTILINE)
    assert match, f'no summary row for {metric}:\n{out[-3000:]}'
    return float(match.group(1))


# ----------------------------------------------------------------------
# tests
@pytest.mark.parametrize('name', list(FAMILIES))
@pytest.mark.slow
def test_upstream_config_trains_and_tests(name, runs, exported_student):
    """Train a few iterations and test through the tools; only the
    backbone, its readers' channels and the data differ from upstream."""
    family = FAMILIES[name]
    run = runs(name)
    assert_only_backbone_and_data_changed(run.upstream, run.cfg, family)
    assert run.ok, run.out[-4000:]
    assert re.search(r'(Iter|Epoch)\(train\) ', run.out), run.out[-3000:]
    value = _summary_value(run.out, family.scope)
    upper = 1.0 if family.scope == 'mmdet' else 100.0
    assert value == -1.0 or 0.0 <= value <= upper, value
    if name == 'cascade-mask-rcnn':
        det = run.cfg.model.backbone.init_cfg.checkpoint
        assert det.endswith(osp.join('work_retinanet', 'epoch_1.pth'))
        assert f'load backbone. in model from: {det}' in run.out
        assert re.search(r'^\| detection \| CocoDataset \| coco/segm_mAP',
                         run.out, re.MULTILINE)
    else:  # the exported student, from init_cfg or mmseg's pretrained
        assert f'load model from: {exported_student["path"]}' in run.out
    # every key of the student (or of the RetinaNet's backbone) was used
    assert 'do not match exactly' not in run.out


@pytest.mark.slow
def test_prefix_takes_the_backbone_out_of_a_saved_detector(runs):
    """The RetinaNet checkpoint saved by tools/train.py (state_dict with
    backbone, neck and head, meta, message hub, optimizer) gives, with
    ``init_cfg`` ``prefix='backbone.'``, exactly its backbone."""
    run = runs('retinanet')
    assert run.ok, run.out[-4000:]
    saved = safe_torch_load(run.checkpoint)['state_dict']
    backbone = {k[len('backbone.'):]: v for k, v in saved.items()
                if k.startswith('backbone.')}
    assert any(k.startswith('neck.') for k in saved)
    cfg = run.cfg.model.backbone.to_dict()
    cfg.pop('type')
    cfg['init_cfg'] = dict(type='Pretrained', checkpoint=run.checkpoint,
                           prefix='backbone.')
    torch.manual_seed(0)
    model = AdapterViT(**cfg)
    model.init_weights()
    state = model.state_dict()
    assert state.keys() == backbone.keys()
    for key, value in backbone.items():
        assert torch.equal(state[key], value), key
