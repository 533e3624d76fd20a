"""kiv.AdapterViT: frozen base ViT (timm / mmpretrain) + zero-init adapter.

Tiny random bases (width 64, depth 4, patch 14) are saved to files and
loaded through the real loading paths.
"""
from __future__ import annotations

import importlib

import pytest
import timm
import torch
from mmpretrain.models.backbones import VisionTransformer as MMPViT

import kiv  # noqa: F401  registers kiv.*
from kiv.models.backbones import AdapterViT, MMPretrainBaseViT, TimmBaseViT
from kiv.structures import FeatureOutput

TIMM_NAME = 'vit_small_patch14_reg4_dinov2'
TIMM_KWARGS = dict(img_size=56, embed_dim=64, depth=4, num_heads=2)
MMP_ARCH = dict(
    embed_dims=64, num_layers=4, num_heads=2, feedforward_channels=128)
INDEXES = [[0, 0], [1, 1], [2, 2], [3, 3]]
SIZES = [(56, 56), (70, 84)]  # patch 14: a square grid and a resized one
C = 64


def make_timm_model() -> torch.nn.Module:
    return timm.create_model(
        TIMM_NAME,
        pretrained=False,
        dynamic_img_size=True,
        num_classes=0,
        **TIMM_KWARGS).eval()


def make_mmp_model() -> torch.nn.Module:
    model = MMPViT(
        arch=MMP_ARCH, patch_size=14, img_size=56, out_type='raw')
    model.init_weights()
    model.eval()  # mmpretrain's train() returns None
    return model


@pytest.fixture(scope='module')
def timm_ckpt(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    """A tiny DINOv2-style (4 registers) timm ViT and its weights file."""
    torch.manual_seed(0)
    model = make_timm_model()
    path = str(tmp_path_factory.mktemp('timm') / 'vit.pth')
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope='module')
def mmp_ckpt(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    """A tiny mmpretrain ViT saved as a classifier checkpoint."""
    torch.manual_seed(0)
    model = make_mmp_model()
    state = {f'backbone.{k}': v for k, v in model.state_dict().items()}
    state['head.layers.head.weight'] = torch.zeros(10, C)
    path = str(tmp_path_factory.mktemp('mmp') / 'cls.pth')
    torch.save(dict(meta=dict(epoch=1), state_dict=state), path)
    return path, model


def base_cfg(kind: str, path: str | None) -> dict:
    if kind == 'timm':
        return dict(
            type='timm',
            model_name=TIMM_NAME,
            checkpoint=path,
            model_kwargs=TIMM_KWARGS)
    return dict(
        type='mmpretrain',
        arch=MMP_ARCH,
        patch_size=14,
        img_size=56,
        checkpoint=path)


def build(kind: str, path: str | None, **kwargs) -> AdapterViT:
    cfg = dict(
        base=base_cfg(kind, path),
        interaction_indexes=INDEXES,
        conv_inplane=16,
        deform_num_heads=2,
        n_points=2)
    cfg.update(kwargs)
    return AdapterViT(**cfg)


@pytest.fixture(params=['timm', 'mmpretrain'])
def case(request, timm_ckpt, mmp_ckpt):
    """(kind, checkpoint path, bare library model with the same weights)."""
    path, model = timm_ckpt if request.param == 'timm' else mmp_ckpt
    return request.param, path, model


def bare_tokens(kind: str, model: torch.nn.Module, x: torch.Tensor):
    """The library's own token stream (after the final norm)."""
    if kind == 'timm':
        return model.forward_features(x)
    return model(x)[0]


# ---------------------------------------------------------------- base ViT
def test_base_wrappers_match_library_forward(case):
    kind, path, model = case
    base = build(kind, path).base
    assert base.embed_dim == C and base.patch_size == 14 and base.depth == 4
    assert base.num_prefix_tokens == (5 if kind == 'timm' else 1)
    assert base.has_class_token
    torch.manual_seed(1)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            tokens = base.embed(x)
            ref = bare_tokens(kind, model, x)
            assert tokens.shape == (2, base.num_prefix_tokens +
                                    (h // 14) * (w // 14), C)
            assert torch.equal(base.forward_tokens(x), ref)


def test_timm_loads_official_dinov2_layout(timm_ckpt, tmp_path):
    """DINOv2's own key layout converts through timm's filter function."""
    _, model = timm_ckpt
    sd = model.state_dict()
    cls_pos = torch.randn(1, 1, C)
    official = {
        k: v
        for k, v in sd.items()
        if k not in ('cls_token', 'reg_token', 'pos_embed')
    }
    official.update(
        cls_token=sd['cls_token'] - cls_pos,
        register_tokens=sd['reg_token'],
        pos_embed=torch.cat((cls_pos, sd['pos_embed']), dim=1),
        mask_token=torch.zeros(1, C))
    path = str(tmp_path / 'dinov2_vits14_reg4_pretrain.pth')
    torch.save(official, path)
    base = TimmBaseViT(TIMM_NAME, checkpoint=path, model_kwargs=TIMM_KWARGS)
    for k, v in base.model.state_dict().items():
        assert torch.allclose(v, sd[k], atol=1e-6), k


def test_base_checkpoint_errors(timm_ckpt, mmp_ckpt, tmp_path):
    path, model = timm_ckpt
    sd = dict(model.state_dict())
    sd.pop('blocks.0.attn.qkv.weight')
    sd['extra.weight'] = torch.zeros(1)
    bad = str(tmp_path / 'bad.pth')
    torch.save(sd, bad)
    with pytest.raises(ValueError) as err:
        TimmBaseViT(TIMM_NAME, checkpoint=bad, model_kwargs=TIMM_KWARGS)
    msg = str(err.value)
    assert bad in msg and 'blocks.0.attn.qkv.weight' in msg
    assert 'extra.weight' in msg

    wide = dict(MMP_ARCH, embed_dims=32, num_heads=2)
    with pytest.raises(ValueError, match='weights do not fit'):
        MMPretrainBaseViT(arch=wide, patch_size=14, checkpoint=mmp_ckpt[0])
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        TimmBaseViT(TIMM_NAME, checkpoint=str(tmp_path / 'missing.pth'),
                    model_kwargs=TIMM_KWARGS)
    with pytest.raises(ValueError, match=r'base.model_kwargs.*pretrained'):
        TimmBaseViT(TIMM_NAME, model_kwargs=dict(pretrained=True))
    with pytest.raises(ValueError, match="base.type='hf'"):
        AdapterViT(base=dict(type='hf'))
    with pytest.raises(TypeError, match='base.*model_nam'):
        AdapterViT(base=dict(type='timm', model_nam=TIMM_NAME))


# ------------------------------------------------------------ zero init
def test_zero_init_keeps_base_token_stream(case):
    """gamma = 0: the stream inside the adapter is the bare base's, exactly.
    """
    kind, path, model = case
    torch.manual_seed(2)
    adapter = build(kind, path)
    adapter.init_weights()  # must not re-init the base nor the gammas
    bare = build(kind, path).base  # an independent copy of the weights
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            inside = adapter.forward_base_tokens(x)
            plain = bare.embed(x)
            for block in bare.blocks:
                plain = block(plain)
            assert (inside - plain).abs().max().item() == 0
            assert torch.equal(inside, plain)
            ref = bare_tokens(kind, model, x)
            assert torch.equal(adapter.base.norm(inside), ref)
            summary = adapter.forward_features(x).summary
            assert torch.equal(summary, ref[:, 0])


def test_one_step_moves_gammas_and_stream(timm_ckpt):
    path, model = timm_ckpt
    torch.manual_seed(3)
    adapter = build('timm', path).train()
    optim = torch.optim.AdamW(
        [p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 3, 56, 56)
    out = adapter.forward_features(x)
    loss = out.summary.pow(2).mean() + sum(
        f.pow(2).mean() for f in out.features)
    loss.backward()
    assert all(p.grad is None for p in adapter.base.parameters())
    optim.step()
    gammas = [b.injector.gamma for b in adapter.interactions]
    gammas.append(adapter.global_token.gamma)
    assert all(g.abs().sum() > 0 for g in gammas)
    adapter.eval()
    with torch.no_grad():
        inside = adapter.base.norm(adapter.forward_base_tokens(x))
        assert not torch.equal(inside, model.forward_features(x))
        assert not torch.equal(adapter(x)[0], out.features[0])


# ------------------------------------------------------------ outputs
@pytest.mark.parametrize('out_type', ['pyramid', 'global', 'both'])
def test_output_types_and_strides(timm_ckpt, out_type):
    adapter = build(
        'timm', timm_ckpt[0], out_type=out_type, out_indices=(1, 3)).eval()
    h, w = 70, 84
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        feats = adapter.forward_features(x)
        outs = adapter(x)
    assert adapter.embed_dim == C and adapter.patch_size == 14
    assert adapter.out_channels == (C, C)
    assert isinstance(feats, FeatureOutput)
    assert feats.summary.shape == (2, C)
    for feat, stride in zip(feats.features, (4, 8, 16, 32)):
        assert feat.shape == (2, C, -(-h // stride), -(-w // stride))
    maps = [feats.features[1], feats.features[3]]
    expected = {
        'pyramid': maps,
        'global': [feats.summary],
        'both': maps + [feats.summary]
    }[out_type]
    assert len(outs) == len(expected)
    for out, ref in zip(outs, expected):
        assert torch.equal(out, ref)


def test_bad_input_size(timm_ckpt):
    adapter = build('timm', timm_ckpt[0])
    with pytest.raises(ValueError, match=r'57x56 .*patch size 14'):
        adapter(torch.randn(1, 3, 57, 56))


def test_bad_options(timm_ckpt):
    path = timm_ckpt[0]
    with pytest.raises(ValueError, match='interaction_indexes'):
        build('timm', path, interaction_indexes=[[0, 1], [3, 3]])
    with pytest.raises(ValueError, match='frozen_stages=6'):
        build('timm', path, frozen_stages=6)
    with pytest.raises(ValueError, match="out_type='cls'"):
        build('timm', path, out_type='cls')
    with pytest.raises(ValueError, match='out_indices'):
        build('timm', path, out_indices=(4, ))


# ------------------------------------------------------------ freezing
def test_base_frozen_adapter_trainable(timm_ckpt):
    adapter = build('timm', timm_ckpt[0])
    adapter.train()
    assert not adapter.base.training
    assert all(not m.training for m in adapter.base.modules())
    assert all(not p.requires_grad for p in adapter.base.parameters())
    adapter_params = [
        p for n, p in adapter.named_parameters() if not n.startswith('base.')
    ]
    assert adapter_params and all(p.requires_grad for p in adapter_params)
    assert adapter.spm.training and adapter.interactions[0].training


def test_frozen_stages(timm_ckpt):
    path = timm_ckpt[0]
    probe = build('timm', path, frozen_stages=5, out_type='global').train()
    assert probe.num_stages == 6
    assert not any(p.requires_grad for p in probe.parameters())
    leaves = [m for m in probe.modules() if not any(m.children())]
    assert not any(m.training for m in leaves)

    stem = build('timm', path, frozen_stages=1).train()
    assert not stem.level_embed.requires_grad
    assert not any(p.requires_grad for p in stem.spm.parameters())
    assert not any(p.requires_grad for p in stem.interactions[0].parameters())
    assert not stem.spm.training and not stem.interactions[0].training
    assert all(p.requires_grad for p in stem.interactions[1].parameters())
    assert stem.interactions[1].training and stem.out_norms.training


def test_with_cp_matches(timm_ckpt):
    torch.manual_seed(4)
    plain = build('timm', timm_ckpt[0]).train()
    cp = build('timm', timm_ckpt[0], with_cp=True).train()
    cp.load_state_dict(plain.state_dict())
    for g in (plain, cp):  # nonzero gammas so the injector path matters
        for block in g.interactions:
            block.injector.gamma.data.fill_(0.1)
    x = torch.randn(2, 3, 56, 56)
    grads = []
    for model in (plain, cp):
        feats = model.forward_features(x)
        (feats.summary.sum() + sum(f.sum() for f in feats.features)).backward()
        grads.append(model.spm.fc2.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


# ------------------------------------------------------- export / registry
def test_pretrained_init_cfg_roundtrip(case, tmp_path):
    kind, path, _ = case
    torch.manual_seed(5)
    trained = build(kind, path, out_type='both')
    for block in trained.interactions:  # make it a non-initial student
        block.injector.gamma.data.normal_()
    trained.global_token.gamma.data.normal_()
    student = str(tmp_path / 'student.pth')
    torch.save(dict(state_dict=trained.state_dict()), student)

    torch.manual_seed(6)  # a different random base and adapter
    loaded = build(
        kind,
        None,
        out_type='both',
        init_cfg=dict(type='Pretrained', checkpoint=student))
    loaded.init_weights()
    trained.eval()
    loaded.eval()
    x = torch.randn(2, 3, 70, 84)
    with torch.no_grad():
        for a, b in zip(trained(x), loaded(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize('toolbox', ['mmdet', 'mmseg', 'mmpretrain'])
def test_build_from_toolbox_registries(timm_ckpt, toolbox):
    registry = importlib.import_module(f'{toolbox}.registry').MODELS
    cfg = dict(
        type='kiv.AdapterViT',
        base=base_cfg('timm', timm_ckpt[0]),
        interaction_indexes=INDEXES,
        conv_inplane=16,
        deform_num_heads=2,
        out_indices=(1, 2))
    model = registry.build(cfg).eval()
    assert isinstance(model, AdapterViT)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 56, 56))
    assert [tuple(o.shape) for o in outs] == [(1, C, 7, 7), (1, C, 4, 4)]


def test_mmpretrain_classifier_uses_global_vector(timm_ckpt):
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    backbone = dict(
        type='kiv.AdapterViT',
        base=base_cfg('timm', timm_ckpt[0]),
        interaction_indexes=INDEXES,
        conv_inplane=16,
        deform_num_heads=2,
        out_type='global',
        frozen_stages=5)
    # as in an mmpretrain config (default_scope='mmpretrain'), whatever
    # scope earlier tests left current
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        classifier = MODELS.build(
            dict(type='ImageClassifier', backbone=backbone,
                 head=dict(type='LinearClsHead', num_classes=3,
                           in_channels=C)))
    classifier.init_weights()
    classifier.train()
    trainable = [
        n for n, p in classifier.named_parameters() if p.requires_grad
    ]
    assert trainable == ['head.fc.weight', 'head.fc.bias']
    with torch.no_grad():
        logits = classifier(torch.randn(2, 3, 56, 56), mode='tensor')
    assert logits.shape == (2, 3)
