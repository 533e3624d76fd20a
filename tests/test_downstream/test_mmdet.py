"""mmdet downstream: kiv.SimplePyramid, the Mask R-CNN configs and importing
kiv into mmdet's own configs.

The tiny configs run through ``tools/train.py`` / ``tools/test.py`` on the
tiny COCO layout with a student exported from a real tiny distillation run
(``exported_student``); the real-scale configs are checked for consistency
with the distillation recipe without building ViT-B.
"""
from __future__ import annotations

import glob
import inspect
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper

from kiv.testing.paths import REAL_DISTILL_CFG as DISTILL_CFG
from kiv.testing.paths import TINY_DISTILL_CFG as DISTILL_TINY_CFG
from kiv.testing.paths import REPO
from kiv.testing.tools import run_tool
from kiv.utils.checkpoint import safe_torch_load
from kiv.models.backbones import AdapterViT
from kiv.models.necks import SimplePyramid

CFG_DIR = osp.join(REPO, 'configs', 'mmdet')
REAL_CFGS = {
    neck: osp.join(CFG_DIR,
                   f'mask-rcnn_kiv-adapter-vit-b14_{neck}_8xb2-1x_coco.py')
    for neck in ('fpn', 'simple-pyramid')
}
TINY_CFGS = {
    neck: osp.join(
        CFG_DIR, f'mask-rcnn_kiv-adapter-vit-t14_{neck}_1xb1-2it_tiny-coco.py')
    for neck in ('fpn', 'simple-pyramid')
}
#: the same on ``kiv.InheritedBackbone`` (the detector teacher's space)
INHERITED_CFGS = dict(
    real=osp.join(CFG_DIR,
                  'mask-rcnn_kiv-inherited-vit-b14_fpn_8xb2-1x_coco.py'),
    tiny=osp.join(CFG_DIR,
                  'mask-rcnn_kiv-inherited-vit-t14_fpn_1xb1-2it_tiny-coco.py'))
#: Mask R-CNN feature sizes of the tiny models for a 70x70 input.
TINY_LEVEL_SIZES = {
    'fpn': [18, 9, 5, 3, 2],
    'simple-pyramid': [20, 10, 5, 3, 2],
}
IMPORT_CFG = osp.join(CFG_DIR, 'import_example',
                      'mask-rcnn_kiv-adapter-vit-b14_fpn_1x_coco.py')
IMPORT_TINY_CFG = osp.join(
    CFG_DIR, 'import_example',
    'mask-rcnn_kiv-adapter-vit-t14_fpn_1xb2-1e_tiny-coco.py')
#: AdapterViT arguments that change the state dict (must match the student).
ARCH_ARGS = ('interaction_indexes', 'conv_inplane', 'deform_num_heads',
             'n_points', 'deform_ratio', 'with_cffn', 'cffn_ratio',
             'with_global_token', 'summary_names', 'use_extra_extractor',
             'add_vit_feature')
NOT_MATCHING = 'do not match exactly'  # mmengine's partial-load warning


def _upstream_config() -> str:
    """Path of mmdet's installed ``mask-rcnn_r50_fpn_1x_coco.py``."""
    import mmdet
    return osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs',
                    'mask_rcnn', 'mask-rcnn_r50_fpn_1x_coco.py')


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _summary(out: str) -> dict[str, float]:
    """metric -> value from tools/test.py's summary table."""
    rows = re.findall(r'^\| detection \| CocoDataset \| (\S+) \| (\S+) \|',
                      out, flags=re.M)
    return {key: float(value) for key, value in rows}


def _assert_coco_ap(metrics: dict[str, float]) -> None:
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        assert key in metrics, sorted(metrics)
    for key, value in metrics.items():
        assert value == -1.0 or 0.0 <= value <= 1.0, (key, value)


@pytest.fixture
def mmdet_scope():
    """mmdet's modules registered and its scope current for the test only
    (other tests keep whatever default scope they had)."""
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmdet'):
        yield


# ----------------------------------------------------------------------
# kiv.SimplePyramid
def _vit_maps(batch: int = 2, channels: int = 64,
              size: int = 64) -> list[torch.Tensor]:
    """A kiv.AdapterViT-like pyramid: strides 4/8/16/32."""
    return [torch.rand(batch, channels, size // s, size // s)
            for s in (4, 8, 16, 32)]


def test_simple_pyramid_levels_from_stride16_map():
    torch.manual_seed(0)
    neck = SimplePyramid(in_channels=64, out_channels=32)
    maps = _vit_maps()
    outs = neck(maps)
    assert [tuple(o.shape) for o in outs] == [
        (2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2),
        (2, 32, 1, 1)]
    # only the selected (stride 16) map is read
    others = [m if i == 2 else torch.full_like(m, float('nan'))
              for i, m in enumerate(maps)]
    for a, b in zip(neck(others), outs):
        torch.testing.assert_close(a, b)
    # P6 = FPN-style max-pool (kernel 1, stride 2) of P5
    torch.testing.assert_close(outs[4], outs[3][..., ::2, ::2])
    # channels of the branches before the 1x1 convs: C/4, C/2, C, C
    assert [m.conv.in_channels for m in neck.lateral_convs] == \
        [16, 32, 64, 64]
    outs[0].sum().backward()
    assert neck.resamplers[0][0].weight.grad.abs().sum() > 0


def test_simple_pyramid_options():
    x = torch.rand(1, 48, 6, 10)
    neck = SimplePyramid(48, 16, in_index=0, scale_factors=(2.0, 1.0, 0.5),
                         num_outs=3)
    sizes = [tuple(o.shape[-2:]) for o in neck([x])]
    assert sizes == [(12, 20), (6, 10), (3, 5)]
    neck = SimplePyramid(48, 16, in_index=-1, scale_factors=(1.0, ),
                         num_outs=3)
    sizes = [tuple(o.shape[-2:]) for o in neck([x])]
    assert sizes == [(6, 10), (3, 5), (2, 3)]


@pytest.mark.parametrize('kwargs, match', [
    (dict(scale_factors=(4.0, 3.0)), r'scale_factors=\[4.0, 3.0\]'),
    (dict(scale_factors=(1.0, 2.0)), r'scale_factors=\[1.0, 2.0\]'),
    (dict(scale_factors=(2.0, 2.0)), r'scale_factors=\[2.0, 2.0\]'),
    (dict(num_outs=3), 'num_outs=3'),
    (dict(in_channels=66), 'divisible'),
])
def test_simple_pyramid_bad_arguments(kwargs, match):
    args = dict(in_channels=64, out_channels=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SimplePyramid(**args)


def test_simple_pyramid_bad_inputs():
    neck = SimplePyramid(64, 32)
    with pytest.raises(ValueError, match=r'in_index=2 .*\(1 maps\)'):
        neck([torch.rand(1, 64, 4, 4)])
    with pytest.raises(ValueError, match=r'expected a \(B, 64, H, W\)'):
        neck(_vit_maps(channels=32))


# ----------------------------------------------------------------------
# configs
ALL_CFGS = sorted(glob.glob(osp.join(CFG_DIR, '**', '*.py'), recursive=True))
#: config keys whose ``type`` names an mmcv op, not a registered class
OP_KEYS = ('.nms', '.roi_layer')


def _types(node, path=''):
    """``(key path, type)`` of every ``type`` in a config tree."""
    if isinstance(node, dict):
        if isinstance(node.get('type'), str):
            yield path, node['type']
        for key, value in node.items():
            yield from _types(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _types(value, f'{path}[{i}]')


@pytest.mark.parametrize('path', ALL_CFGS,
                         ids=lambda p: osp.relpath(p, CFG_DIR))
def test_config_types_resolve_in_mmdet(path, mmdet_scope):
    """Every mmdet config parses and names only classes that mmdet's
    registries (and, through them, kiv's) resolve."""
    import mmdet.registry as mmdet_registry
    from mmengine.registry import Registry
    registries = [r for r in vars(mmdet_registry).values()
                  if isinstance(r, Registry)]
    cfg = Config.fromfile(path)
    assert cfg.default_scope == 'mmdet'
    for where, type_ in _types(cfg.to_dict()):
        if where.endswith(OP_KEYS):
            continue
        assert any(r.get(type_) is not None for r in registries), \
            f'{path}: {where} type={type_!r}'


def _adapter_args(cfg: dict) -> dict:
    """Effective AdapterViT arguments of a backbone config (with defaults)."""
    params = inspect.signature(AdapterViT.__init__).parameters
    args = {k: p.default for k, p in params.items()
            if p.default is not inspect.Parameter.empty}
    args.update(cfg)
    args['interaction_indexes'] = [list(p) for p in
                                   args['interaction_indexes']]
    return args


@pytest.mark.parametrize('name', [*REAL_CFGS, 'import_example'])
def test_real_configs_fit_the_distilled_student(name):
    """The downstream backbones rebuild the real recipe's student exactly,
    so ``init_cfg`` loads the exported checkpoint without missing keys."""
    cfg = Config.fromfile(REAL_CFGS.get(name, IMPORT_CFG))
    student = _adapter_args(Config.fromfile(DISTILL_CFG).model.student)
    backbone = _adapter_args(cfg.model.backbone)
    assert backbone['type'] == 'kiv.AdapterViT'
    assert backbone['base']['model_name'] == student['base']['model_name']
    assert {k: backbone[k] for k in ARCH_ARGS} == \
        {k: student[k] for k in ARCH_ARGS}
    assert backbone['init_cfg'] == dict(
        type='Pretrained', checkpoint='checkpoints/kiv_vit-b14_student.pth')
    assert 'kiv' in cfg.custom_imports.imports
    # mmdet's own padding: the backbone pads to its patches inside
    assert cfg.model.data_preprocessor.pad_size_divisor == 32
    assert set(cfg.val_evaluator.metric) == {'bbox', 'segm'}
    assert cfg.val_evaluator.type == 'CocoMetric'
    if name == 'import_example':
        return
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert cfg.optim_wrapper.constructor == \
        'kiv.BackboneLayerDecayOptimWrapperConstructor'
    assert cfg.find_unused_parameters  # the global token gets no gradient
    assert backbone['norm_cfg']['type'] == 'SyncBN'
    if name == 'simple-pyramid':
        assert cfg.model.neck.type == 'kiv.SimplePyramid'
        assert cfg.model.neck.norm_cfg['type'] == 'SyncBN'
    else:
        assert cfg.model.neck.type == 'FPN'
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.auto_scale_lr.base_batch_size == 16


def _flat(obj, prefix: str = '') -> dict:
    """Nested dicts/lists -> ``{'a.b.0.c': value}``, without mmengine's
    ``_scope_`` markers (added to every dict of a config read through
    ``mmdet::``)."""
    if isinstance(obj, dict):
        pairs = [(k, v) for k, v in obj.items() if k != '_scope_']
    elif isinstance(obj, (list, tuple)):
        pairs = list(enumerate(obj))
    else:
        return {prefix[:-1]: obj}
    items = {}
    for k, v in pairs:
        items.update(_flat(v, f'{prefix}{k}.'))
    return items


def test_import_example_changes_only_the_backbone():
    """The import example is mmdet's own config plus the kiv lines: the
    backbone block, the neck's input channels and ``custom_imports``."""
    upstream = Config.fromfile(_upstream_config()).to_dict()
    ours = Config.fromfile(IMPORT_CFG).to_dict()
    a, b = _flat(upstream), _flat(ours)
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    allowed = ('model.backbone.', 'model.neck.in_channels.',
               'custom_imports.')
    assert {k for k in changed if not k.startswith(allowed)} == set()
    assert ours['model']['neck']['in_channels'] == [768] * 4
    assert ours['model']['backbone']['type'] == 'kiv.AdapterViT'


# ----------------------------------------------------------------------
# tiny configs through the tools
@pytest.mark.parametrize('name', list(TINY_CFGS))
@pytest.mark.slow
def test_tiny_train_and_test_from_exported_student(name, exported_student,
                                                   data_dir):
    cfg, ckpt = TINY_CFGS[name], exported_student['path']
    work = osp.join(data_dir, f'work_mmdet_{name}')
    opts = ['--cfg-options', f'model.backbone.init_cfg.checkpoint={ckpt}']
    out = _ok(run_tool(['train.py', cfg, '--work-dir', work, *opts],
                       data_dir))
    assert f'load model from: {ckpt}' in out
    assert NOT_MATCHING not in out
    assert 'Iter(train) [2/2]' in out
    out = _ok(run_tool(['test.py', cfg, osp.join(work, 'iter_2.pth'),
                        '--work-dir', work, *opts], data_dir))
    _assert_coco_ap(_summary(out))


def test_inherited_backbone_config_fits_the_recipe():
    """The real config on ``kiv.InheritedBackbone`` wraps the FPN config's
    student unchanged and reads the recipe's detector teacher as it was
    distilled: its student levels, one scale factor per level (P6 at half
    the stride-32 grid), the teacher's 5 x 256 channels into the FPN."""
    cfg = Config.fromfile(INHERITED_CFGS['real'])
    base = Config.fromfile(REAL_CFGS['fpn'])
    recipe = Config.fromfile(DISTILL_CFG).model
    wrapper = cfg.model.backbone
    assert wrapper.type == 'kiv.InheritedBackbone'
    assert wrapper.backbone == base.model.backbone
    assert wrapper.checkpoint == wrapper.backbone.init_cfg.checkpoint
    assert wrapper.teacher in recipe.teachers
    assert recipe.teachers[wrapper.teacher].source.config.endswith(
        'mask-rcnn_r50_fpn_1x_coco.py')
    levels = recipe.latent.teachers[wrapper.teacher].student_levels
    assert wrapper.student_levels == levels
    assert wrapper.scale_factors == [1, 1, 1, 1, 0.5]
    assert cfg.model.neck.in_channels == [256] * len(levels)
    assert cfg.model.neck.num_outs == len(levels)
    assert cfg.optim_wrapper.constructor == \
        'kiv.BackboneLayerDecayOptimWrapperConstructor'


@pytest.mark.slow
def test_tiny_train_and_test_on_the_inherited_backbone(
        exported_student, data_dir):
    """The tiny config on ``kiv.InheritedBackbone`` (the student's maps in
    the tiny recipe's detector teacher's space, its s2t heads read from the
    distillation checkpoint) trains and tests through the tools, layer-wise
    lr decay included: the student loads its export, the neck takes the
    teacher's channels at the teacher's strides."""
    from kiv.models.connectors import read_latent_state
    ckpt = exported_student['path']
    heads = osp.join(exported_student['root'], 'distill', 'iter_2.pth')
    latent = read_latent_state(heads)
    cfg = Config.fromfile(INHERITED_CFGS['tiny'])
    assert cfg.model.neck.in_channels == [
        latent[f'feature_heads.detector.{lv}.fc2.weight'].shape[0]
        for lv in range(3)]
    assert cfg.model.backbone.student_levels == Config.fromfile(
        DISTILL_TINY_CFG).model.latent.teachers['detector'].student_levels
    opts = ['--cfg-options',
            f'model.backbone.backbone.init_cfg.checkpoint={ckpt}',
            f'model.backbone.checkpoint={heads}']
    work = osp.join(data_dir, 'work_mmdet_inherited')
    out = _ok(run_tool(['train.py', INHERITED_CFGS['tiny'], '--work-dir',
                        work, *opts], data_dir))
    assert f'load model from: {ckpt}' in out
    assert NOT_MATCHING not in out
    assert 'Iter(train) [2/2]' in out
    out = _ok(run_tool(['test.py', INHERITED_CFGS['tiny'],
                        osp.join(work, 'iter_2.pth'), '--work-dir', work,
                        *opts], data_dir))
    _assert_coco_ap(_summary(out))


@pytest.mark.parametrize('name', list(TINY_CFGS))
@pytest.mark.slow
def test_tiny_model_inherits_exported_weights(name, exported_student,
                                              mmdet_scope):
    """Direct build: after init_weights the backbone holds the exported
    student exactly, and the neck gives Mask R-CNN its 5 levels."""
    from mmdet.registry import MODELS
    cfg = Config.fromfile(TINY_CFGS[name])
    cfg.model.backbone.init_cfg.checkpoint = exported_student['path']
    model = MODELS.build(cfg.model)
    model.init_weights()
    exported = safe_torch_load(exported_student['path'])['state_dict']
    state = model.backbone.state_dict()
    assert state.keys() == exported.keys()
    for key, value in exported.items():
        assert torch.equal(state[key], value), key
    # the configs' layer-wise lr decay reaches AdapterViT.get_layer_depth:
    # base block 0 = layer 1 of 4 + 2, neck and heads the full lr
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    lrs = {g['param_name']: g['lr'] for g in optim.optimizer.param_groups}
    lr = cfg.optim_wrapper.optimizer.lr
    rate = cfg.optim_wrapper.paramwise_cfg.layer_decay_rate
    block0 = lrs['backbone.base.model.blocks.0.attn.qkv.weight']
    assert block0 == pytest.approx(lr * rate**4)
    stem = lrs['backbone.spm.stem.0.conv.weight']
    assert stem == pytest.approx(lr * rate**5)
    neck_lrs = [v for k, v in lrs.items() if k.startswith('neck.')]
    assert neck_lrs and all(v == pytest.approx(lr) for v in neck_lrs)
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, 70, 70))
    assert all(f.shape[:2] == (1, 32) for f in feats)
    # 70 px: the adapter's levels are ceil(70 / s) = 18/9/5/3 px (strides
    # 4-32); the FPN adds P6 = 2, the simple pyramid rescales level 2 (5)
    # to 20/10/5/3 (+ P6 2).
    assert [f.shape[-1] for f in feats] == TINY_LEVEL_SIZES[name]


# ----------------------------------------------------------------------
# metric wiring
@pytest.mark.parametrize('name', list(TINY_CFGS))
def test_roi_features_of_a_kiv_backbone_are_the_right_ones(name,
                                                           mmdet_scope):
    """mmcv's RoIAlign reads its input as contiguous NCHW memory
    (open-mmlab/mmcv#2203); the adapter works channels-last inside, so its
    maps (and the necks' maps after them) must leave it contiguous or every
    RoI gets features of other places and channels."""
    from mmdet.registry import MODELS as DET_MODELS
    cfg = Config.fromfile(TINY_CFGS[name])
    cfg.model.backbone.pop('init_cfg', None)
    model = DET_MODELS.build(cfg.model).eval()
    rois = torch.tensor([[0., 5., 5., 40., 40.], [1., 10., 12., 60., 50.]])
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(2, 3, 70, 70))
        for extractor in (model.roi_head.bbox_roi_extractor,
                          model.roi_head.mask_roi_extractor):
            levels = feats[:extractor.num_inputs]
            torch.testing.assert_close(
                extractor(levels, rois),
                extractor(tuple(f.contiguous() for f in levels), rois),
                atol=0, rtol=0)


def _gt_as_predictions(dataset, shuffle: str | None = None) -> list:
    """DetDataSamples whose predictions are the ground truth (score 1).

    ``shuffle='images'`` gives every image the next image's objects;
    ``shuffle='labels'`` swaps the two classes.
    """
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    samples = [dataset[i]['data_samples'] for i in range(len(dataset))]
    gts = [s.gt_instances for s in samples]
    if shuffle == 'images':
        gts = gts[1:] + gts[:1]
    outs = []
    for sample, gt in zip(samples, gts):
        masks = torch.from_numpy(gt.masks.to_ndarray()).bool()
        pred = DetDataSample(metainfo=sample.metainfo)
        labels = 1 - gt.labels if shuffle == 'labels' else gt.labels
        pred.pred_instances = InstanceData(
            bboxes=gt.bboxes.tensor, labels=labels,
            scores=torch.ones(len(labels)), masks=masks)
        outs.append(pred)
    return outs


def test_coco_metric_wiring_both_ways(data_dir, monkeypatch, mmdet_scope):
    """The tiny config's dataset and CocoMetric: ground truth fed as
    predictions scores AP 1; predictions moved to other images or given the
    other class score (nearly) nothing."""
    from mmdet.registry import DATASETS
    from mmengine.evaluator import Evaluator
    monkeypatch.chdir(data_dir)  # configs use data/coco/ relative paths
    cfg = Config.fromfile(TINY_CFGS['fpn'])
    dataset = DATASETS.build(cfg.val_dataloader.dataset)
    assert len(dataset) >= 2

    def evaluate(shuffle):
        evaluator = Evaluator(cfg.val_evaluator)
        evaluator.dataset_meta = dataset.metainfo
        evaluator.process(_gt_as_predictions(dataset, shuffle))
        return evaluator.evaluate(len(dataset))

    metrics = evaluate(None)
    assert metrics['coco/bbox_mAP'] == pytest.approx(1.0)
    assert metrics['coco/segm_mAP'] == pytest.approx(1.0)
    for shuffle in ('images', 'labels'):
        metrics = evaluate(shuffle)
        assert metrics['coco/bbox_mAP'] < 0.5, shuffle
        assert metrics['coco/segm_mAP'] < 0.5, shuffle


# ----------------------------------------------------------------------
# importing kiv into an existing mmdet project
@pytest.mark.slow
def test_import_into_upstream_config(exported_student, data_dir):
    """mmdet's own Mask R-CNN config with the kiv backbone (5-line file):
    train one epoch (2 iterations), then test through the tools."""
    ckpt = exported_student['path']
    work = osp.join(data_dir, 'work_mmdet_import')
    opts = ['--cfg-options', f'model.backbone.init_cfg.checkpoint={ckpt}']
    out = _ok(run_tool(['train.py', IMPORT_TINY_CFG, '--work-dir', work,
                        *opts], data_dir))
    assert f'load model from: {ckpt}' in out
    assert NOT_MATCHING not in out
    assert 'Epoch(train) [1][2/2]' in out
    out = _ok(run_tool(['test.py', IMPORT_TINY_CFG,
                        osp.join(work, 'epoch_1.pth'), '--work-dir', work,
                        *opts], data_dir))
    _assert_coco_ap(_summary(out))


@pytest.mark.slow
def test_import_into_upstream_config_with_cfg_options_only(
        exported_student, data_dir):
    """The same without any config file of ours: mmdet's installed config
    and ``--cfg-options`` (``_delete_`` replaces the ResNet settings)."""
    upstream = _upstream_config()
    b = 'model.backbone.'
    kiv_lines = [
        f'{b}_delete_=true', f'{b}type=kiv.AdapterViT',
        f'{b}base.type=timm',
        f'{b}base.model_name=vit_small_patch14_reg4_dinov2',
        f'{b}base.model_kwargs.img_size=56',
        f'{b}base.model_kwargs.embed_dim=64',
        f'{b}base.model_kwargs.depth=4', f'{b}base.model_kwargs.num_heads=2',
        f'{b}interaction_indexes=[[0,0],[1,1],[2,2],[3,3]]',
        f'{b}conv_inplane=16', f'{b}deform_num_heads=2', f'{b}n_points=2',
        f'{b}summary_names=[dinov2,clip]',
        f'{b}init_cfg.type=Pretrained',
        f'{b}init_cfg.checkpoint={exported_student["path"]}',
        'model.neck.in_channels=[64,64,64,64]',
    ]
    tiny_data = [
        'model.roi_head.bbox_head.num_classes=2',
        'model.roi_head.mask_head.num_classes=2',
        'train_cfg.max_epochs=1',
    ]
    for split, resize_index in (('train', 2), ('val', 1), ('test', 1)):
        tiny_data += [
            f'{split}_dataloader.dataset.metainfo.classes=[class0,class1]',
            f'{split}_dataloader.dataset.pipeline.{resize_index}.scale='
            '(64,64)',
        ]
    work = osp.join(data_dir, 'work_mmdet_cli')
    out = _ok(run_tool(['train.py', upstream, '--work-dir', work,
                        '--cfg-options', *kiv_lines, *tiny_data], data_dir))
    assert f'load model from: {exported_student["path"]}' in out
    assert NOT_MATCHING not in out
    assert 'Epoch(train) [1][2/2]' in out
    assert 'coco/segm_mAP' in out  # validation after the epoch
