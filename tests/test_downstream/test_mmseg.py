"""mmseg downstream: UperNet on kiv.AdapterViT, ADE20K mIoU, layer decay.

The tiny config inherits the real one, so training / testing it through the
tools exercises the real structure (crops that are not multiples of the
patch 14, UperNet, layer-decay AdamW, IoUMetric) on CPU.
"""
import inspect
import os.path as osp
import re

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

from kiv.models.backbones import AdapterViT
from kiv.testing.paths import REPO
from kiv.testing.tools import run_tool

SEG = osp.join(REPO, 'configs', 'mmseg')
REAL_CFG = osp.join(
    SEG, 'upernet_kiv-adapter-vit-b14_8xb2-160k_ade20k-512x512.py')
TINY_CFG = osp.join(
    SEG, 'upernet_kiv-adapter-vit-t14_1xb2-2it_tiny-ade20k-48x48.py')
#: AdapterViT options that must match the exported student's architecture
ARCH_KEYS = ('interaction_indexes', 'conv_inplane', 'deform_num_heads',
             'n_points', 'deform_ratio', 'cffn_ratio')


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _summary_value(out: str, task: str, dataset: str, metric: str) -> float:
    match = re.search(
        rf'^\| {task} \| {dataset} \| {re.escape(metric)} \| ([-\d.]+) \|',
        out, re.MULTILINE)
    assert match, f'no summary row for {metric}:\n{out[-2000:]}'
    return float(match.group(1))


@pytest.fixture(scope='module')
def tiny_cfg() -> Config:
    return Config.fromfile(TINY_CFG)


@pytest.mark.slow
def test_real_and_tiny_configs(tiny_cfg, exported_student):
    real = Config.fromfile(REAL_CFG)
    for cfg, crop in ((real, 512), (tiny_cfg, 48)):
        model = cfg.model
        assert model.backbone.type == 'kiv.AdapterViT'
        assert model.backbone.out_type == 'pyramid'
        assert model.decode_head.type == 'UPerHead'
        assert model.decode_head.in_channels == [
            model.backbone.base.model_kwargs.get('embed_dim', 768)] * 4
        assert cfg.optim_wrapper.constructor == \
            'kiv.BackboneLayerDecayOptimWrapperConstructor'
        assert cfg.test_evaluator.type == 'IoUMetric'
        assert cfg.test_dataloader.dataset.type == 'ADE20KDataset'
        # mmseg's own crops (not multiples of the patch 14: the backbone
        # pads inside), batches of exactly the crop size, whole-image test
        crop_steps = [t for t in cfg.train_pipeline if t.type == 'RandomCrop']
        assert crop_steps[0].crop_size == (crop, crop)
        assert crop % 14
        assert model.data_preprocessor.size == (crop, crop)
        assert 'test_cfg' not in model.data_preprocessor
        assert model.test_cfg.mode == 'whole'
    assert real.optim_wrapper.type == 'AmpOptimWrapper'
    assert real.model.backbone.norm_cfg.type == 'SyncBN'
    assert real.model.backbone.init_cfg.checkpoint == \
        'checkpoints/kiv_vit-b14_student.pth'
    assert real.train_cfg.max_iters == 160000
    # the tiny config describes the tiny student that the tests export
    tiny, student = tiny_cfg.model.backbone, exported_student['backbone']
    defaults = inspect.signature(AdapterViT).parameters
    for key in ARCH_KEYS:
        assert tiny[key] == student.get(key, defaults[key].default), key
    assert tiny.base.model_name == student['base']['model_name']
    kwargs = dict(tiny.base.model_kwargs)
    kwargs.pop('drop_path_rate')
    assert kwargs == student['base']['model_kwargs']


@pytest.mark.slow
def test_train_and_test_tiny_upernet(data_dir, exported_student, tmp_path):
    work = str(tmp_path / 'work')
    ckpt = exported_student['path']
    out = _ok(run_tool(
        ['train.py', TINY_CFG, '--work-dir', work, '--cfg-options',
         f'model.backbone.init_cfg.checkpoint={ckpt}'], data_dir))
    assert 'Iter(train) [2/2]' in out
    assert f'load model from: {ckpt}' in out
    assert 'missing keys in source state_dict' not in out
    assert osp.isfile(osp.join(work, 'iter_2.pth'))
    out = _ok(run_tool(['test.py', TINY_CFG, osp.join(work, 'iter_2.pth'),
                        '--work-dir', work], data_dir))
    miou = _summary_value(out, 'segmentation', 'ADE20KDataset', 'mIoU')
    assert 0.0 <= miou <= 100.0


def _tiny_val_set(cfg: Config, data_dir: str):
    from mmseg.registry import DATASETS
    init_default_scope('mmseg')
    dataset_cfg = cfg.test_dataloader.dataset.copy()
    dataset_cfg.data_root = osp.join(data_dir, dataset_cfg.data_root)
    return DATASETS.build(dataset_cfg)


def test_iou_metric_wiring(tiny_cfg, data_dir):
    """Ground truth as prediction gives mIoU 100, wrong maps clearly less.
    """
    from mmseg.registry import METRICS
    dataset = _tiny_val_set(tiny_cfg, data_dir)
    assert len(dataset) == 2
    gts = []
    for i in range(len(dataset)):
        sample = dataset[i]['data_samples']
        gt = sample.gt_sem_seg.data
        # reduce_zero_label: PNG 0 ("other") -> 255 ignored, k -> k - 1
        raw = cv2.imread(sample.seg_map_path, cv2.IMREAD_UNCHANGED)
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
        assert np.array_equal(gt[0].numpy(), expected)
        gts.append(gt)
    assert {0, 1} <= set(torch.cat([g.flatten() for g in gts]).tolist())

    def miou(preds):
        metric = METRICS.build(tiny_cfg.test_evaluator)
        metric.dataset_meta = dataset.metainfo
        metric.process({}, [
            dict(pred_sem_seg=dict(data=p), gt_sem_seg=dict(data=g))
            for p, g in zip(preds, gts)
        ])
        return float(metric.evaluate(len(gts))['mIoU'])

    labels = [torch.where(g == 255, 0, g) for g in gts]
    assert miou(labels) == 100.0
    assert miou([torch.roll(t, 24, dims=-1) for t in labels]) < 60.0
    assert miou([1 - t for t in labels]) < 10.0


def test_layer_decay_param_groups(tiny_cfg):
    """kiv's constructor gives the UperNet model mmpretrain's decayed groups
    (mmpretrain's own constructor cannot: segmentors lack get_layer_depth).
    """
    from mmpretrain.engine.optimizers import \
        LearningRateDecayOptimWrapperConstructor
    from mmseg.registry import MODELS
    init_default_scope('mmseg')
    model = MODELS.build(tiny_cfg.model)
    optim_cfg = tiny_cfg.optim_wrapper.to_dict()
    optim_cfg.pop('constructor')
    paramwise_cfg = optim_cfg.pop('paramwise_cfg')
    with pytest.raises(NotImplementedError):
        LearningRateDecayOptimWrapperConstructor(optim_cfg,
                                                 paramwise_cfg)(model)

    groups = build_optim_wrapper(model, tiny_cfg.optim_wrapper) \
        .optimizer.param_groups
    by_name = {g['param_name']: g for g in groups}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(by_name) == sorted(trainable)

    base_lr = tiny_cfg.optim_wrapper.optimizer.lr
    rate = tiny_cfg.optim_wrapper.paramwise_cfg.layer_decay_rate
    num_layers = 4 + 2  # tiny base: 4 blocks

    def lr(layer_id):
        return base_lr * rate**(num_layers - 1 - layer_id)

    expected = {
        'backbone.base.model.patch_embed.proj.weight': 0,
        'backbone.base.model.reg_token': 0,
        'backbone.spm.stem.0.conv.weight': 0,
        'backbone.level_embed': 0,
        'backbone.base.model.blocks.0.attn.qkv.weight': 1,
        'backbone.base.model.blocks.3.mlp.fc2.weight': 4,
        'backbone.interactions.1.injector.attn.value_proj.weight': 1,
        'backbone.interactions.1.extractor.attn.value_proj.weight': 2,
        'backbone.base.model.norm.weight': 5,
        'backbone.out_norms.0.weight': 5,
        'decode_head.conv_seg.weight': 5,
        'auxiliary_head.conv_seg.weight': 5,
    }
    for name, layer_id in expected.items():
        assert by_name[name]['layer_id'] == layer_id, name
        assert by_name[name]['lr'] == pytest.approx(lr(layer_id)), name
    wd = tiny_cfg.optim_wrapper.optimizer.weight_decay
    assert by_name['backbone.base.model.blocks.0.attn.qkv.weight'][
        'weight_decay'] == wd
    for name in ('backbone.base.model.pos_embed',
                 'backbone.base.model.blocks.0.norm1.weight',
                 'backbone.interactions.0.injector.gamma',
                 'backbone.level_embed', 'decode_head.conv_seg.bias'):
        assert by_name[name]['weight_decay'] == 0.0, name
