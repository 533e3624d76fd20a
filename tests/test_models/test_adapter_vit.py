"""kiv.AdapterViT: frozen base ViT (timm / mmpretrain) + zero-init adapter.

Tiny random bases (width 64, depth 4, patch 14) are saved to files and
loaded through the real loading paths.
"""
from __future__ import annotations

import importlib
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from mmpretrain.models.backbones import VisionTransformer as MMPViT

import kiv  # noqa: F401  registers kiv.*
from kiv.models.backbones import AdapterViT, MMPretrainBaseViT, TimmBaseViT
from kiv.structures import FeatureOutput
from kiv.utils.weights import TeacherCheckpointError

TIMM_NAME = 'vit_small_patch14_reg4_dinov2'
TIMM_KWARGS = dict(img_size=56, embed_dim=64, depth=4, num_heads=2)
MMP_ARCH = dict(
    embed_dims=64, num_layers=4, num_heads=2, feedforward_channels=128)
INDEXES = [[0, 0], [1, 1], [2, 2], [3, 3]]
SIZES = [(56, 56), (70, 84)]  # patch 14: a square grid and a resized one
#: sizes that are not multiples of the patch: odd, 800x1333-like (1/16),
#: 512-like (1/8), and one below a single patch row
ODD_SIZES = [(50, 70), (50, 83), (64, 64), (13, 30)]
C = 64
STRIDES = (4, 8, 16, 32)


def ceil_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """The ResNet-convention sizes of the four levels."""
    return [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]


def pad14(x: torch.Tensor) -> torch.Tensor:
    """Zero padding to multiples of 14, as a data preprocessor's
    ``pad_size_divisor=14`` (after normalisation) would do it."""
    return F.pad(x, (0, -x.shape[-1] % 14, 0, -x.shape[-2] % 14))


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
    base = TimmBaseViT(TIMM_NAME, checkpoint=path, model_kwargs=TIMM_KWARGS,
                       drop_keys=[r'^mask_token$'])
    for k, v in base.model.state_dict().items():
        assert torch.allclose(v, sd[k], atol=1e-6), k
    # the same loading path as the teachers: nothing dropped silently
    with pytest.raises(TeacherCheckpointError, match='mask_token'):
        TimmBaseViT(TIMM_NAME, checkpoint=path, model_kwargs=TIMM_KWARGS)


def test_base_checkpoint_errors(timm_ckpt, mmp_ckpt, tmp_path):
    path, model = timm_ckpt
    sd = dict(model.state_dict())
    sd.pop('blocks.0.attn.qkv.weight')
    sd['extra.weight'] = torch.zeros(1)
    bad = str(tmp_path / 'bad.pth')
    torch.save(sd, bad)
    with pytest.raises(TeacherCheckpointError) as err:
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
    for h, w in SIZES + ODD_SIZES:
        x = torch.randn(2, 3, h, w)
        padded = pad14(x)  # what the adapter pads to inside
        with torch.no_grad():
            inside = adapter.forward_base_tokens(x)
            plain = bare.embed(padded)
            for block in bare.blocks:
                plain = block(plain)
            assert (inside - plain).abs().max().item() == 0
            assert torch.equal(inside, plain)
            ref = bare_tokens(kind, model, padded)
            assert torch.equal(adapter.base.norm(inside), ref)
            summary = adapter.forward_features(x).summary
            assert torch.equal(summary, ref[:, 0])


def test_internal_padding_is_timms_dynamic_img_pad(timm_ckpt):
    """The base stream on an unpadded odd-sized input equals timm's own
    ``dynamic_img_pad=True`` model with the same weights."""
    path, model = timm_ckpt
    timm_pad = timm.create_model(
        TIMM_NAME, pretrained=False, dynamic_img_size=True,
        dynamic_img_pad=True, num_classes=0, **TIMM_KWARGS).eval()
    timm_pad.load_state_dict(model.state_dict())
    adapter = build('timm', path).eval()
    torch.manual_seed(7)
    for h, w in ODD_SIZES:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            inside = adapter.base.norm(adapter.forward_base_tokens(x))
            assert torch.equal(inside, timm_pad.forward_features(x)), (h, w)


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
    gammas.extend(adapter.pyramid_gammas)
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
    # contiguous NCHW: mmcv's RoIAlign reads channels-last maps wrongly
    # (the adapter works channels-last inside)
    assert all(f.is_contiguous() for f in feats.features + outs)
    maps = [feats.features[1], feats.features[3]]
    expected = {
        'pyramid': maps,
        'global': [feats.summary],
        'both': maps + [feats.summary]
    }[out_type]
    assert len(outs) == len(expected)
    for out, ref in zip(outs, expected):
        assert torch.equal(out, ref)


# ------------------------------------------------------- any input size
@pytest.mark.parametrize('size', ODD_SIZES + SIZES)
def test_any_input_size_gives_resnet_sizes(case, size):
    """Every level is exactly (ceil(H/s), ceil(W/s)), the sizes of a ResNet's
    C2..C5 that mmdet necks and mmseg heads expect."""
    kind, path, _ = case
    adapter = build(kind, path, out_type='both').eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats = adapter.forward_features(x)
        outs = adapter(x)
    expected = [(2, C, h, w) for h, w in ceil_sizes(*size)]
    assert [tuple(f.shape) for f in feats.features[:4]] == expected
    assert [tuple(o.shape) for o in outs[:4]] == expected
    assert outs[4].shape == (2, C)
    # the distiller's extra patch-grid level: the grid of the padded input
    assert len(feats.features) == 5
    assert feats.features[4].shape == (2, C, math.ceil(size[0] / 14),
                                       math.ceil(size[1] / 14))


def _trained_like(adapter: AdapterViT) -> AdapterViT:
    """Non-zero gammas and gates: every path reaches the outputs."""
    for block in adapter.interactions:
        block.injector.gamma.data.normal_()
    adapter.global_token.gamma.data.normal_()
    for gate in adapter.pyramid_gammas:
        gate.data.normal_()
    return adapter


def test_internal_padding_equals_data_preprocessor_padding(case):
    """What "padding never leaks" means: the backbone's own padding (zeros
    after normalisation) is exactly a data preprocessor's padding to the
    patch multiple, and what lies only in the padding is cropped off. So an
    odd-sized input gives the cropped outputs of the explicitly padded one,
    bit for bit, for a student with every path active."""
    kind, path, _ = case
    torch.manual_seed(8)
    adapter = _trained_like(build(kind, path, out_type='both')).eval()
    for h, w in ODD_SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            outs = adapter(x)
            ref = adapter(pad14(x))
        for out, big, (lh, lw) in zip(outs, ref, ceil_sizes(h, w)):
            assert torch.equal(out, big[..., :lh, :lw]), (h, w)
        assert torch.equal(outs[4], ref[4])


def test_output_norms_never_see_padding_only_positions(timm_ckpt):
    """In training the output norms' batch statistics come from the cropped
    maps only: positions that exist only in the padding are not counted."""
    adapter = build('timm', timm_ckpt[0]).train()
    seen = _norm_inputs(adapter, torch.randn(2, 3, 50, 83))
    assert [tuple(m.shape[-2:]) for m in seen] == ceil_sizes(50, 83)


def _norm_inputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    """What each output norm of ``model`` receives for ``x``."""
    seen = []
    hooks = [norm.register_forward_pre_hook(
        lambda m, args: seen.append(args[0])) for norm in model.out_norms]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


#: a tiny patch-8 base for kiv_demo.PlainViTStudent (powers of two only)
PLAIN_BASE = dict(type='timm', model_name='vit_small_patch14_reg4_dinov2',
                  checkpoint=None,
                  model_kwargs=dict(img_size=64, patch_size=8, embed_dim=32,
                                    depth=2, num_heads=2))


def test_plain_vit_student_any_input_size(kiv_demo):
    """kiv_demo.PlainViTStudent (the demo's, same interface): ResNet
    sizes, and its maps are those of the explicitly padded input, cropped
    before the output norms."""
    torch.manual_seed(9)
    student = kiv_demo.PlainViTStudent(base=PLAIN_BASE,
                                       out_type='both').eval()
    for h, w in ODD_SIZES + [(64, 64), (56, 56)]:
        x = torch.randn(2, 3, h, w)
        padded = F.pad(x, (0, -w % 8, 0, -h % 8))
        with torch.no_grad():
            outs = student(x)
            ref = student(padded)
        sizes = ceil_sizes(h, w)
        assert [tuple(o.shape) for o in outs[:4]] == \
            [(2, 32, lh, lw) for lh, lw in sizes]
        assert torch.equal(outs[4], ref[4])  # the summary
        for a, b, (lh, lw) in zip(_norm_inputs(student, x),
                                  _norm_inputs(student, padded), sizes):
            assert torch.equal(a, b[..., :lh, :lw]), (h, w)


def test_bad_input(timm_ckpt):
    adapter = build('timm', timm_ckpt[0])
    with pytest.raises(ValueError, match=r'AdapterViT expects images'):
        adapter(torch.randn(3, 56, 56))


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


# ------------------------------------------- knowledge-preserving pyramid
def _base_stage_maps(kind: str, path: str, x: torch.Tensor
                     ) -> list[torch.Tensor]:
    """The bare base's LayerNorm-ed patch tokens after each interaction
    stage, as maps on the patch grid of the padded input."""
    bare = build(kind, path).base
    padded = pad14(x)
    grid = (padded.shape[-2] // 14, padded.shape[-1] // 14)
    tokens = bare.embed(padded)
    maps = []
    for start, end in INDEXES:
        for block in bare.blocks[start:end + 1]:
            tokens = block(tokens)
        patches = F.layer_norm(tokens[:, bare.num_prefix_tokens:], (C, ),
                               eps=1e-6)
        maps.append(patches.transpose(1, 2).reshape(x.shape[0], C, *grid))
    return maps


def _expected_levels(kind: str, path: str, x: torch.Tensor
                     ) -> list[torch.Tensor]:
    """out_norm(resize(LN(stage tokens))) cropped to the ResNet sizes, with
    the output BNs at initialisation in eval mode (x / sqrt(1 + eps))."""
    h, w = x.shape[-2:]
    hp, wp = pad14(x).shape[-2:]
    levels = []
    for vit, s, (lh, lw) in zip(_base_stage_maps(kind, path, x), STRIDES,
                                ceil_sizes(h, w)):
        size = (math.ceil(hp / s), math.ceil(wp / s))
        vit = F.interpolate(vit, size=size, mode='bilinear',
                            align_corners=False)
        levels.append(vit[..., :lh, :lw] / math.sqrt(1 + 1e-5))
    return levels


def _position_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine over channels at every position: ``(B, h, w)``."""
    return F.cosine_similarity(a, b, dim=1)


@pytest.mark.parametrize('size', [(56, 56), (50, 70)])
def test_pyramid_at_init_is_the_base_tokens_of_each_stage(case, size):
    """At step 0 each level is the base's normed tokens of its stage
    (resized), not the random spatial prior / up-sampler. ViT-Adapter's
    formulation (adapter maps at full strength, random 2x2 transposed conv)
    fails the same check."""
    kind, path, _ = case
    torch.manual_seed(10)
    x = torch.randn(2, 3, *size)
    adapter = build(kind, path).eval()
    with torch.no_grad():
        levels = adapter.forward_features(x).features
        expected = _expected_levels(kind, path, x)
    for level, ref in zip(levels, expected):
        torch.testing.assert_close(level, ref, atol=1e-5, rtol=1e-5)
        assert _position_cosine(level, ref).min() > 0.999

    vit_adapter = build(kind, path, pyramid_init_values=1.0).eval()
    torch.nn.init.normal_(vit_adapter.up.weight,
                          std=math.sqrt(2.0 / (4 * C)))
    with torch.no_grad():
        levels = vit_adapter.forward_features(x).features
    assert _position_cosine(levels[0], expected[0]).median() < 0.9


def _checkerboard_energy(level: torch.Tensor) -> float:
    """Share of a map's spatial variance in its 2x2 sub-pixel pattern (what
    remains after averaging each 2x2 block)."""
    level = level[..., :level.shape[-2] // 2 * 2, :level.shape[-1] // 2 * 2]
    centred = level - level.mean((-2, -1), keepdim=True)
    blocks = F.interpolate(F.avg_pool2d(centred, 2), scale_factor=2,
                           mode='nearest')
    return float((centred - blocks).pow(2).sum() / centred.pow(2).sum())


def test_stride4_level_is_no_checkerboard(timm_ckpt):
    """The demo's PCA picture: the untouched student's stride-4
    level is a smooth function of the image, with or without the pyramid
    gate open (``up`` starts as nearest up-sampling), while a random 2x2
    transposed conv puts a large share of it into a fixed 2x2 pattern."""
    path = timm_ckpt[0]
    torch.manual_seed(11)
    # smooth images: low-frequency noise, as photos are
    x = F.interpolate(torch.randn(2, 3, 9, 9), size=(112, 112),
                      mode='bilinear', align_corners=False)
    adapter = build('timm', path).eval()
    opened = build('timm', path, pyramid_init_values=1.0).eval()
    random_up = build('timm', path, pyramid_init_values=1.0).eval()
    torch.nn.init.normal_(random_up.up.weight, std=math.sqrt(2.0 / (4 * C)))
    with torch.no_grad():
        energies = [_checkerboard_energy(m.forward_features(x).features[0])
                    for m in (adapter, opened, random_up)]
    # bilinear up-sampling of a 14-px token grid keeps a little energy at
    # the 2x2 scale; the random transposed conv puts about half there
    assert energies[0] < 0.15 and energies[1] < 0.15, energies
    assert energies[2] > 0.3, energies


def test_up_starts_as_nearest_upsampling(timm_ckpt):
    adapter = build('timm', timm_ckpt[0])
    assert all(torch.equal(g, torch.zeros(C))
               for g in adapter.pyramid_gammas)
    c2 = torch.randn(2, C, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.up(c2), F.interpolate(c2, scale_factor=2,
                                          mode='nearest'),
            rtol=0, atol=0)


# --------------------------------------------- toolbox loading conventions
def _save_student(tmp_path, seed: int) -> tuple[str, AdapterViT]:
    torch.manual_seed(seed)
    trained = _trained_like(build('timm', None))
    path = str(tmp_path / 'student.pth')
    torch.save(dict(state_dict=trained.state_dict()), path)
    return path, trained


def _assert_same_weights(model: torch.nn.Module,
                         ref: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(state[key], value), key


def test_pretrained_string_is_init_cfg_with_the_toolbox_warning(
        tmp_path, kiv_demo):
    path, trained = _save_student(tmp_path, 13)
    with pytest.warns(UserWarning, match='DeprecationWarning: pretrained is '
                      'deprecated, please use "init_cfg" instead'):
        loaded = build('timm', None, pretrained=path)
    assert loaded.init_cfg == dict(type='Pretrained', checkpoint=path)
    loaded.init_weights()
    _assert_same_weights(loaded, trained.state_dict())
    with pytest.warns(UserWarning, match='pretrained is deprecated'):
        plain = kiv_demo.PlainViTStudent(base=PLAIN_BASE, pretrained=path)
    assert plain.init_cfg == dict(type='Pretrained', checkpoint=path)


def test_mmseg_model_pretrained_reaches_the_backbone(tmp_path):
    """mmseg's EncoderDecoder passes ``model.pretrained`` to the backbone:
    the student loads from it, as a ResNet would from its weights."""
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    path, trained = _save_student(tmp_path, 14)
    backbone = ConfigDict(
        type='kiv.AdapterViT', base=base_cfg('timm', None),
        interaction_indexes=INDEXES, conv_inplane=16, deform_num_heads=2,
        n_points=2)
    head = dict(type='FCNHead', in_channels=C, channels=8, num_convs=1,
                in_index=2, num_classes=2)
    with DefaultScope.overwrite_default_scope('mmseg'), \
            warnings.catch_warnings():
        warnings.simplefilter('ignore')
        segmentor = MODELS.build(dict(type='EncoderDecoder', pretrained=path,
                                      backbone=backbone, decode_head=head))
    segmentor.init_weights()
    _assert_same_weights(segmentor.backbone, trained.state_dict())


def test_pretrained_errors(tmp_path, kiv_demo):
    path = str(tmp_path / 'student.pth')
    with pytest.raises(ValueError, match=r'pretrained=.*init_cfg=.*both '
                       r'set.*model\.pretrained=None'):
        build('timm', None, pretrained=path,
              init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(TypeError, match='AdapterViT: pretrained must be a '
                       'str'):
        build('timm', None, pretrained=dict(checkpoint=path))
    with pytest.raises(ValueError, match=r"pretrained='open-mmlab://resnet50"
                       r"_v1c' names model-zoo weights"):
        build('timm', None, pretrained='open-mmlab://resnet50_v1c')
    with pytest.raises(ValueError, match='PlainViTStudent: pretrained='):
        kiv_demo.PlainViTStudent(
            base=PLAIN_BASE, pretrained=path,
            init_cfg=dict(type='Pretrained', checkpoint=path))


class _Foreign:
    """Not on any weights-only allowlist."""


@pytest.fixture
def kiv_safe_loader():
    """kiv's safe I/O switched on for this test, as kiv's tools do (and
    restored to what it was afterwards)."""
    from kiv.engine import disable_safe_io, enable_safe_io
    switched_on = enable_safe_io()
    yield
    if switched_on:
        disable_safe_io()


def test_init_cfg_prefix_loads_the_backbone_of_a_detector_checkpoint(
        tmp_path, kiv_safe_loader):
    """``init_cfg=dict(type='Pretrained', prefix='backbone.')`` takes the
    student out of a whole detector checkpoint (mmdet's file layout:
    ``meta`` + ``state_dict`` with ``backbone.`` / ``neck.`` / heads). With
    kiv's safe I/O on (``kiv.enable_safe_io``, what kiv's tools run with),
    mmengine's prefix path reads it with kiv's weights-only loader, which
    refuses an unsafe file there too."""
    from kiv.utils.checkpoint import UnsafeCheckpointError
    _, trained = _save_student(tmp_path, 15)
    state = {f'backbone.{k}': v for k, v in trained.state_dict().items()}
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(8, C, 1, 1)
    state['rpn_head.rpn_cls.bias'] = torch.zeros(3)
    det = str(tmp_path / 'retinanet_kiv.pth')
    torch.save(dict(meta=dict(epoch=1, iter=2, dataset_meta=dict(
        classes=('a', 'b'))), state_dict=state), det)
    loaded = build('timm', None, init_cfg=dict(
        type='Pretrained', checkpoint=det, prefix='backbone.'))
    loaded.init_weights()
    _assert_same_weights(loaded, trained.state_dict())

    unsafe = str(tmp_path / 'unsafe_det.pth')
    torch.save(dict(meta=dict(hook=_Foreign()), state_dict=state), unsafe)
    with pytest.raises(UnsafeCheckpointError, match='unsafe_det.pth'):
        build('timm', None, init_cfg=dict(
            type='Pretrained', checkpoint=unsafe,
            prefix='backbone.')).init_weights()
    with pytest.raises(AssertionError, match='head. is not in the '
                       'pretrained model'):
        build('timm', None, init_cfg=dict(
            type='Pretrained', checkpoint=det,
            prefix='head.')).init_weights()
