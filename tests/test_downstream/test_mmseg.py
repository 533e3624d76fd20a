"""mmseg downstream: UperNet on kiv.AdapterViT and on kiv.InheritedBackbone,
ADE20K mIoU, layer decay.

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
from kiv.testing.paths import REAL_DISTILL_CFG as DISTILL_CFG
from kiv.testing.paths import TINY_DISTILL_CFG as DISTILL_TINY_CFG
from kiv.testing.paths import REPO
from kiv.testing.tools import run_tool
from kiv.utils.checkpoint import safe_torch_load

SEG = osp.join(REPO, 'configs', 'mmseg')
REAL_CFG = osp.join(
    SEG, 'upernet_kiv-adapter-vit-b14_8xb2-160k_ade20k-512x512.py')
TINY_CFG = osp.join(
    SEG, 'upernet_kiv-adapter-vit-t14_1xb2-2it_tiny-ade20k-48x48.py')
#: the same on ``kiv.InheritedBackbone`` (the detector teacher's space)
INHERITED_CFGS = dict(
    real=osp.join(
        SEG, 'upernet_kiv-inherited-vit-b14_8xb2-160k_ade20k-512x512.py'),
    tiny=osp.join(
        SEG, 'upernet_kiv-inherited-vit-t14_1xb2-2it_tiny-ade20k-48x48.py'))
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


# ----------------------------------------------------------------------
# UperNet on kiv.InheritedBackbone (the recipe's detector teacher's space)
#: exported student weights the segmentation student leaves out
#: (``with_global_token=False``, no summaries): its global tokens
SUMMARY_KEYS = ('global_token.', 'summary_tokens.')


def _assert_student_loaded(out: str, ckpt: str) -> None:
    """The student's ``init_cfg`` loaded ``ckpt`` and mmengine's partial-load
    warning names nothing but the global tokens the config leaves out: no
    missing key, no size mismatch."""
    assert f'load model from: {ckpt}' in out
    assert 'missing keys in source state_dict' not in out
    assert 'size mismatch' not in out
    lines = re.findall(r'unexpected key in source state_dict: (.*)', out)
    keys = [k.strip() for line in lines for k in line.split(',')]
    assert all(k.startswith(SUMMARY_KEYS) for k in keys), keys


def _recipe_detector_neck() -> Config:
    """The FPN of the real recipe's detector teacher (mmdet's config)."""
    from mmengine.hub import get_config
    recipe = Config.fromfile(DISTILL_CFG).model
    source = recipe.teachers.detector.source
    assert source.config.endswith('mask-rcnn_r50_fpn_1x_coco.py')
    return get_config(source.config).model.neck


def test_inherited_backbone_config_fits_the_recipe():
    """The real config on ``kiv.InheritedBackbone`` wraps the UperNet
    config's student unchanged and reads the recipe's Mask R-CNN teacher as
    it was distilled (its student levels; P6 at half the stride-32 grid);
    UperNet reads P2-P5 (strides 4-32, the recipe's first 4 levels) with
    the teacher's 256 channels, the auxiliary head P4 (stride 16) as the
    base config's reads the adapter's stride-16 level."""
    cfg = Config.fromfile(INHERITED_CFGS['real'])
    base = Config.fromfile(REAL_CFG)
    recipe = Config.fromfile(DISTILL_CFG).model
    neck = _recipe_detector_neck()
    wrapper = cfg.model.backbone
    assert wrapper.type == 'kiv.InheritedBackbone'
    assert wrapper.backbone == base.model.backbone
    assert wrapper.checkpoint == wrapper.backbone.init_cfg.checkpoint
    assert wrapper.teacher in recipe.teachers
    assert recipe.teachers[wrapper.teacher].source.part == 'backbone+neck'
    levels = recipe.latent.teachers[wrapper.teacher].student_levels
    # the recipe's levels as distilled (P6 at half the stride-32 grid);
    # only P2-P5 are built and given (out_indices)
    assert wrapper.student_levels == levels
    assert len(levels) == neck.num_outs
    assert wrapper.scale_factors == [1] * (len(levels) - 1) + [0.5]
    assert wrapper.out_indices == [0, 1, 2, 3]
    given = [levels[i] for i in wrapper.out_indices]
    assert given == list(base.model.backbone.out_indices)
    assert all(wrapper.scale_factors[i] == 1 for i in wrapper.out_indices)
    decode, aux = cfg.model.decode_head, cfg.model.auxiliary_head
    assert decode.type == 'UPerHead'
    assert decode.in_index == list(range(len(given)))
    assert decode.in_channels == [neck.out_channels] * 4 == [256] * 4
    assert given[aux.in_index] == \
        base.model.backbone.out_indices[base.model.auxiliary_head.in_index]
    assert aux.in_channels == neck.out_channels
    # the student trains as its config says, with layer-wise lr decay; the
    # base ViT's final norm gets no gradient from the pyramid (DDP)
    assert wrapper.backbone.freeze_base is False
    assert cfg.find_unused_parameters
    assert cfg.optim_wrapper == base.optim_wrapper
    assert cfg.optim_wrapper.constructor == \
        'kiv.BackboneLayerDecayOptimWrapperConstructor'
    for key in ('train_pipeline', 'test_pipeline', 'train_cfg',
                'param_scheduler', 'val_evaluator'):
        assert cfg[key] == base[key], key


@pytest.mark.slow
def test_inherited_real_config_builds_and_decays(tmp_path):
    """The real config builds (ViT-B/14 student, no weights) on a latent
    file of the recipe's detector shape (random s2t heads, 5 levels of
    768 -> 256 channels): UperNet and the auxiliary head take the teacher's
    maps at strides 4-32 and 16, whose gradients reach every student
    parameter but the base ViT's final norm; layer-wise lr decay reaches the
    student through the wrapper and leaves the fixed paths out."""
    from mmseg.registry import MODELS

    from kiv.models.connectors import SharedLatentSpace
    recipe = Config.fromfile(DISTILL_CFG).model
    neck = _recipe_detector_neck()
    levels = recipe.latent.teachers.detector.student_levels
    embed_dim = 768  # ViT-B
    latent = SharedLatentSpace(
        embed_dim, [embed_dim] * 5,
        dict(detector=dict(summary_dim=None,
                           feature_dims=[neck.out_channels] * len(levels),
                           student_levels=levels)),
        standardize=recipe.latent.standardize,
        hidden_dim=recipe.latent.hidden_dim)
    for standardizer in latent.feature_standardizers['detector']:
        standardizer.update(torch.randn(512, neck.out_channels))
    heads = str(tmp_path / 'heads.pth')
    torch.save(dict(inherited_heads=latent.state_dict()), heads)

    cfg = Config.fromfile(INHERITED_CFGS['real'])
    cfg.model.backbone.checkpoint = heads
    cfg.model.backbone.backbone.pop('init_cfg')
    init_default_scope('mmseg')
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, 64, 64) * 255)
        assert [tuple(f.shape[1:]) for f in feats] == [
            (256, 16, 16), (256, 8, 8), (256, 4, 4), (256, 2, 2)]
        assert len(model.backbone.paths) == 4  # P6 is not built
        assert model.decode_head(feats).shape == (1, 150, 16, 16)
        assert model.auxiliary_head(feats).shape == (1, 150, 4, 4)
    # what UperNet reads trains the whole student but the base ViT's final
    # norm (hence find_unused_parameters); the paths are fixed
    feats = model.extract_feat(torch.rand(1, 3, 64, 64) * 255)
    sum(feats[i].sum() for i in cfg.model.decode_head.in_index).backward()
    assert [n for n, p in model.backbone.named_parameters()
            if p.requires_grad and p.grad is None] == \
        ['backbone.base.model.norm.weight', 'backbone.base.model.norm.bias']
    assert not any(p.requires_grad
                   for p in model.backbone.paths.parameters())

    optim_cfg = cfg.optim_wrapper.to_dict()
    optim_cfg['type'] = 'OptimWrapper'  # AMP needs a GPU
    groups = build_optim_wrapper(model, optim_cfg).optimizer.param_groups
    by_name = {g['param_name']: g for g in groups}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(by_name) == sorted(trainable)
    assert not any('.paths.' in n for n in by_name)
    assert any(n.startswith('backbone.backbone.base.') for n in by_name)
    lr = cfg.optim_wrapper.optimizer.lr
    rate = cfg.optim_wrapper.paramwise_cfg.layer_decay_rate
    num_layers = 12 + 2  # ViT-B: 12 blocks
    block0 = by_name['backbone.backbone.base.model.blocks.0.attn.qkv.weight']
    assert block0['layer_id'] == 1
    assert block0['lr'] == pytest.approx(lr * rate**(num_layers - 2))
    head = by_name['decode_head.conv_seg.weight']
    assert head['lr'] == pytest.approx(lr)


@pytest.mark.slow
def test_tiny_train_and_test_on_the_inherited_backbone(
        exported_student, data_dir):
    """The tiny config on ``kiv.InheritedBackbone`` (the student's maps in
    the tiny recipe's detector teacher's space, its s2t heads read from the
    distillation checkpoint) trains and tests through the tools, layer-wise
    lr decay included: the student loads its export, UperNet takes the
    teacher's channels at the teacher's strides, the student trains and
    the paths stay the distillation's."""
    from kiv.models.connectors import read_latent_state
    ckpt = exported_student['path']
    heads = osp.join(exported_student['root'], 'distill', 'iter_2.pth')
    latent = read_latent_state(heads)
    cfg = Config.fromfile(INHERITED_CFGS['tiny'])
    levels = Config.fromfile(
        DISTILL_TINY_CFG).model.latent.teachers['detector'].student_levels
    assert cfg.model.backbone.student_levels == levels
    assert cfg.model.decode_head.in_channels == [
        latent[f'feature_heads.detector.{lv}.fc2.weight'].shape[0]
        for lv in range(len(levels))]
    assert cfg.model.decode_head.in_index == list(range(len(levels)))
    # the auxiliary head reads the stride-16 map, as in the adapter config
    assert levels[cfg.model.auxiliary_head.in_index] == 2
    assert cfg.model.auxiliary_head.in_channels == \
        cfg.model.decode_head.in_channels[1]
    assert cfg.find_unused_parameters  # the stride-4 branch is not read
    opts = ['--cfg-options',
            f'model.backbone.backbone.init_cfg.checkpoint={ckpt}',
            f'model.backbone.checkpoint={heads}']
    work = osp.join(data_dir, 'work_mmseg_inherited')
    out = _ok(run_tool(['train.py', INHERITED_CFGS['tiny'], '--work-dir',
                        work, *opts], data_dir))
    _assert_student_loaded(out, ckpt)
    assert 'Iter(train) [2/2]' in out
    trained = safe_torch_load(osp.join(work, 'iter_2.pth'))['state_dict']
    for lv in range(len(levels)):
        for name in ('fc1.weight', 'fc2.weight'):
            assert torch.equal(
                trained[f'backbone.paths.{lv}.head.{name}'],
                latent[f'feature_heads.detector.{lv}.{name}']), (lv, name)
    exported = safe_torch_load(ckpt)['state_dict']
    key = 'base.model.blocks.0.attn.qkv.weight'
    assert not torch.equal(trained[f'backbone.backbone.{key}'],
                           exported[key])  # freeze_base=False
    out = _ok(run_tool(['test.py', INHERITED_CFGS['tiny'],
                        osp.join(work, 'iter_2.pth'), '--work-dir', work,
                        *opts], data_dir))
    miou = _summary_value(out, 'segmentation', 'ADE20KDataset', 'mIoU')
    assert 0.0 <= miou <= 100.0
