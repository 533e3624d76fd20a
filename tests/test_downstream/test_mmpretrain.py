"""mmpretrain downstream: linear probe and fine-tuning of kiv.AdapterViT,
ImageNet accuracy wiring, and ``AdapterViT.get_layer_depth``.

The tiny configs inherit the real ones; they train through ``tools/train.py``
from a student exported by a real tiny distillation run and are evaluated by
``tools/test.py``.
"""
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

from kiv.utils.checkpoint import safe_torch_load
from kiv.models.backbones import AdapterViT

from kiv.testing.paths import REPO
from kiv.testing.tools import run_tool

CLS = osp.join(REPO, 'configs', 'mmpretrain')
REAL_LP = osp.join(
    CLS, 'kiv-adapter-vit-b14_linear-probe_8xb128-coslr-100e_in1k.py')
REAL_FT = osp.join(CLS, 'kiv-adapter-vit-b14_8xb128-coslr-100e_in1k.py')
TINY_LP = osp.join(
    CLS, 'kiv-adapter-vit-t14_linear-probe_1xb4-coslr-2e_tiny-in1k.py')
TINY_FT = osp.join(CLS, 'kiv-adapter-vit-t14_1xb4-coslr-2e_tiny-in1k.py')

TIMM_BASE = dict(
    type='timm',
    model_name='vit_small_patch14_reg4_dinov2',
    model_kwargs=dict(img_size=56, embed_dim=64, depth=4, num_heads=2))
MMP_BASE = dict(
    type='mmpretrain',
    arch=dict(embed_dims=64, num_layers=4, num_heads=2,
              feedforward_channels=128),
    patch_size=14,
    img_size=56)
TINY_ADAPTER = dict(conv_inplane=16, deform_num_heads=2, n_points=2)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _summary_value(out: str, metric: str) -> float:
    match = re.search(
        rf'^\| classification \| ImageNet \| {re.escape(metric)} '
        r'\| ([-\d.]+) \|', out, re.MULTILINE)
    assert match, f'no summary row for {metric}:\n{out[-2000:]}'
    return float(match.group(1))


# ----------------------------------------------------------------------
# get_layer_depth
def _depths(model: AdapterViT, prefix: str = '') -> dict[str, int]:
    return {
        name: model.get_layer_depth(prefix + name, prefix)[0]
        for name, _ in model.named_parameters()
    }


def test_get_layer_depth_timm_base():
    model = AdapterViT(base=TIMM_BASE, freeze_base=False,
                       interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
                       **TINY_ADAPTER)
    depths = _depths(model)
    assert model.get_layer_depth('base.model.cls_token') == (0, 6)
    for name, layer_id in depths.items():
        if name.startswith(('base.model.patch_embed.', 'spm.')) or name in (
                'base.model.cls_token', 'base.model.reg_token',
                'base.model.pos_embed', 'level_embed'):
            assert layer_id == 0, name
        elif name.startswith('base.model.blocks.'):
            assert layer_id == int(name.split('.')[3]) + 1, name
        elif name.startswith('interactions.'):
            k = int(name.split('.')[1])
            part = name.split('.')[2]
            # injector k writes the input of block k; extractors read its
            # output
            assert layer_id == (k if part == 'injector' else k + 1), name
        else:  # base final norm, pyramid outputs, global / summary tokens
            assert name.startswith(('base.model.norm.', 'up.', 'vit_norms.',
                                    'pyramid_gammas.', 'out_norms.',
                                    'global_token.', 'summary_tokens.')), name
            assert layer_id == 5, name
    # every block is at its own depth: decay really orders the base
    assert sorted(set(depths.values())) == [0, 1, 2, 3, 4, 5]


def test_get_layer_depth_mmpretrain_base_and_prefix():
    """Interactions spanning several blocks, an mmpretrain base (``layers``,
    ``ln1``) and the ``backbone.`` prefix mmpretrain classifiers pass."""
    model = AdapterViT(base=MMP_BASE, freeze_base=False,
                       interaction_indexes=[[0, 1], [2, 2], [3, 3]],
                       add_vit_feature=False, **TINY_ADAPTER)
    depth = model.get_layer_depth
    p = 'backbone.'
    assert depth(p + 'base.model.pos_embed', p) == (0, 6)
    assert depth(p + 'base.model.patch_embed.projection.weight', p) == (0, 6)
    assert depth(p + 'base.model.layers.0.attn.qkv.weight', p) == (1, 6)
    assert depth(p + 'base.model.layers.3.ffn.layers.1.weight', p) == (4, 6)
    assert depth(p + 'base.model.ln1.weight', p) == (5, 6)
    # interaction 0 spans blocks 0..1, interaction 1 block 2
    assert depth(p + 'interactions.0.injector.gamma', p) == (0, 6)
    assert depth(p + 'interactions.0.extractor.ffn.fc1.weight', p) == (2, 6)
    assert depth(p + 'interactions.1.injector.gamma', p) == (2, 6)
    assert depth(p + 'interactions.1.extractor.attn.value_proj.weight',
                 p) == (3, 6)
    assert depth(p + 'interactions.2.extra_extractors.1.ffn.fc2.weight',
                 p) == (4, 6)
    # outside the backbone (heads, necks): full learning rate
    assert depth('head.fc.weight', p) == (5, 6)
    assert all(0 <= d < 6 for d in _depths(model, p).values())


# ----------------------------------------------------------------------
# configs and layer-decay param groups
@pytest.mark.slow
def test_real_and_tiny_configs(exported_student):
    for path in (REAL_LP, TINY_LP, REAL_FT, TINY_FT):
        cfg = Config.fromfile(path)
        backbone = cfg.model.backbone
        assert cfg.model.type == 'ImageClassifier'
        assert backbone.type == 'kiv.AdapterViT'
        assert backbone.out_type == 'global'
        assert cfg.model.head.type == 'LinearClsHead'
        assert cfg.test_evaluator.type == 'Accuracy'
        assert cfg.test_dataloader.dataset.type == 'ImageNet'
        crop = [t for t in cfg.test_pipeline if t.type == 'CenterCrop']
        assert crop[0].crop_size % 14 == 0
        if 'linear-probe' in path:  # everything frozen
            assert backbone.freeze_base is True
            assert backbone.frozen_stages == \
                len(backbone.interaction_indexes) + 1
        else:
            assert backbone.freeze_base is False
            assert backbone.frozen_stages == -1
            assert cfg.optim_wrapper.constructor == \
                'LearningRateDecayOptimWrapperConstructor'
        if 'b14' in path:
            assert cfg.test_evaluator.topk == (1, 5)
            assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
            assert backbone.init_cfg.checkpoint == \
                'checkpoints/kiv_vit-b14_student.pth'
        else:
            student = exported_student['backbone']
            assert backbone.interaction_indexes == \
                student['interaction_indexes']
            assert backbone.base.model_name == \
                student['base']['model_name']


def test_finetune_layer_decay_param_groups():
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(TINY_FT)
    init_default_scope('mmpretrain')
    model = MODELS.build(cfg.model)
    groups = build_optim_wrapper(model, cfg.optim_wrapper) \
        .optimizer.param_groups
    by_name = {g['param_name']: g for g in groups}
    assert sorted(by_name) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad)
    base_lr = cfg.optim_wrapper.optimizer.lr
    rate = cfg.optim_wrapper.paramwise_cfg.layer_decay_rate
    expected = {
        'backbone.base.model.pos_embed': 0,
        'backbone.base.model.blocks.0.attn.qkv.weight': 1,
        'backbone.base.model.blocks.2.attn.qkv.weight': 3,
        'backbone.interactions.3.injector.attn.sampling_offsets.weight': 3,
        'backbone.summary_tokens.dinov2.pool.q.weight': 5,
        'head.fc.weight': 5,
    }
    for name, layer_id in expected.items():
        assert by_name[name]['lr'] == pytest.approx(
            base_lr * rate**(5 - layer_id)), name
    for name in ('backbone.base.model.pos_embed',
                 'backbone.base.model.reg_token',
                 'backbone.summary_tokens.dinov2.pool.latent',
                 'backbone.summary_tokens.clip.gamma', 'head.fc.bias'):
        assert by_name[name]['weight_decay'] == 0.0, name
    assert by_name['head.fc.weight']['weight_decay'] == \
        cfg.optim_wrapper.optimizer.weight_decay


# ----------------------------------------------------------------------
# the tools on the tiny configs
def _train(config: str, work: str, data_dir: str, student: str) -> str:
    out = _ok(run_tool(
        ['train.py', config, '--work-dir', work, '--cfg-options',
         f'model.backbone.init_cfg.checkpoint={student}'], data_dir))
    assert 'Epoch(train) [2][1/1]' in out
    assert f'load model from: {student}' in out
    assert 'missing keys in source state_dict' not in out
    assert 'unexpected key in source state_dict' not in out
    return osp.join(work, 'epoch_2.pth')


def _test_accuracy(config: str, ckpt: str, work: str, data_dir: str) -> None:
    out = _ok(run_tool(['test.py', config, ckpt, '--work-dir', work],
                       data_dir))
    assert 0.0 <= _summary_value(out, 'accuracy/top1') <= 100.0
    assert _summary_value(out, 'accuracy/top2') == 100.0  # 2 classes


@pytest.mark.slow
def test_linear_probe_keeps_the_student(data_dir, exported_student,
                                        tmp_path):
    work = str(tmp_path / 'lp')
    ckpt = _train(TINY_LP, work, data_dir, exported_student['path'])
    student = safe_torch_load(exported_student['path'])['state_dict']
    trained = safe_torch_load(ckpt)['state_dict']
    backbone = {k[len('backbone.'):]: v for k, v in trained.items()
                if k.startswith('backbone.')}
    assert sorted(backbone) == sorted(student)
    for key, value in student.items():  # frozen: weights and BN stats
        assert torch.equal(backbone[key], value), key
    assert trained['head.fc.weight'].shape == (2, 64)
    _test_accuracy(TINY_LP, ckpt, work, data_dir)


@pytest.mark.slow
def test_finetune_trains_the_student(data_dir, exported_student, tmp_path):
    work = str(tmp_path / 'ft')
    ckpt = _train(TINY_FT, work, data_dir, exported_student['path'])
    student = safe_torch_load(exported_student['path'])['state_dict']
    trained = safe_torch_load(ckpt)['state_dict']
    for key in ('base.model.blocks.0.attn.qkv.weight', 'spm.fc2.weight'):
        assert not torch.equal(trained['backbone.' + key], student[key]), key
    _test_accuracy(TINY_FT, ckpt, work, data_dir)


# ----------------------------------------------------------------------
# metric wiring
def test_accuracy_metric_wiring(data_dir):
    """ImageNet labels from the meta files match the class folders; the
    ground truth as prediction scores 100 % top-1, flipped labels less."""
    from mmpretrain.registry import DATASETS, METRICS
    cfg = Config.fromfile(TINY_LP)
    init_default_scope('mmpretrain')
    dataset_cfg = cfg.test_dataloader.dataset.copy()
    dataset_cfg.data_root = osp.join(data_dir, dataset_cfg.data_root)
    dataset = DATASETS.build(dataset_cfg)
    classes = dataset.metainfo['classes']
    assert len(dataset) == 2 and len(classes) == 2
    labels = []
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        folder = osp.basename(osp.dirname(info['img_path']))
        assert info['gt_label'] == classes.index(folder)
        labels.append(int(info['gt_label']))

    def top1(predicted):
        metric = METRICS.build(cfg.test_evaluator)
        metric.process({}, [
            dict(pred_score=torch.nn.functional.one_hot(
                torch.tensor(p), 2).float(), gt_label=torch.tensor([g]))
            for p, g in zip(predicted, labels)
        ])
        return metric.evaluate(len(labels))['accuracy/top1']

    assert top1(labels) == 100.0
    assert top1([1 - g for g in labels]) == 0.0
