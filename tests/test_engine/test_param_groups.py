"""Weight decay reaches exactly the parameters the schedules say.

The optimiser of each shipped recipe is built with mmengine's
``build_optim_wrapper(model, cfg.optim_wrapper)`` on the model the recipe
builds, and every parameter group is checked against an independent rule:

* no weight decay: the adapter's gates (injector / global-token /
  summary-token ``gamma`` s, the pyramid gates ``pyramid_gammas.N``),
  LayerScale ``ls1/ls2.gamma``, the level embedding, the latent queries of
  the attention pools (``pool.latent``), the preserved skip path of the
  base teacher's s2t heads (``*.skip.weight`` / ``.bias``), norms, biases,
  any other 1-d parameter, and (downstream, where the base trains) the
  ViT's position embedding and CLS / register tokens;
* the base weight decay: every other trainable weight (matrices, convs);
* frozen parameters (the knowledge base, every teacher) are in no group.

The real-scale distillation recipe is built through the recipe itself, with
teacher files written in the official layouts
(:mod:`kiv.testing.official_layouts`, random values) and fewer blocks in the
ViTs (4 DINOv2 blocks with one per interaction, 2 CLIP and 2 SAM blocks):
the depth changes how many frozen parameters there are, not which rule any
trainable parameter follows (the adapter, the s2t heads and the latent
space have the same parameters at any base depth). Its ``AmpOptimWrapper``
(bf16) needs a GPU, so the groups are built with the same constructor and
``paramwise_cfg`` under a plain ``OptimWrapper``.
"""
from __future__ import annotations

import copy
import os.path as osp
import re

import pytest
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS as ROOT_MODELS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

import kiv  # noqa: F401  registers kiv.*
from kiv.testing.paths import REAL_DISTILL_CFG as RECIPE
from kiv.testing.paths import REPO, TINY_DISTILL_CFG

NORMS = (nn.LayerNorm, nn.GroupNorm, _BatchNorm, _InstanceNorm)
#: kinds of trainable parameters that must not be decayed
NO_DECAY = ('gate', 'layerscale', 'level_embed', 'latent_query', 'skip',
            'norm', 'bias', 'flat', 'token')


def kind_of(name: str, param: nn.Parameter, module: nn.Module) -> str:
    """What a parameter is, from its full name and owning module (not from
    any config): one of :data:`NO_DECAY` or ``'weight'``."""
    leaf = name.rsplit('.', 1)[-1]
    if re.search(r'(^|\.)ls\d\.gamma$', name):
        return 'layerscale'
    if 'pyramid_gammas.' in name or leaf == 'gamma':
        return 'gate'
    if leaf == 'level_embed':
        return 'level_embed'
    if name.endswith('pool.latent'):
        return 'latent_query'
    if '.skip.' in name:
        return 'skip'
    if isinstance(module, NORMS):
        return 'norm'
    if leaf == 'bias':
        return 'bias'
    if leaf in ('pos_embed', 'cls_token', 'reg_token'):
        return 'token'
    if param.ndim <= 1:
        return 'flat'
    return 'weight'


def parameter_kinds(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """Full name -> (kind, parameter) of every parameter of ``model``."""
    kinds = {}
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            name = f'{mod_name}.{p_name}' if mod_name else p_name
            kinds[name] = (kind_of(name, param, module), param)
    return kinds


def groups_by_name(model: nn.Module, wrapper) -> dict[str, dict]:
    """Full name -> its optimiser group; each parameter in one group."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict] = {}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            name = names[id(p)]
            assert name not in out, f'{name} is in two parameter groups'
            out[name] = group
    return out


def check_decay(model: nn.Module, wrapper, base_wd: float) -> dict:
    """Check every parameter's group; returns ``kind -> [names]`` of the
    trainable parameters and the element counts of decayed / undecayed
    parameters."""
    groups = groups_by_name(model, wrapper)
    seen: dict[str, list[str]] = {}
    wrong = []
    numel = dict(decay=0, no_decay=0, frozen=0)
    for name, (kind, param) in parameter_kinds(model).items():
        if not param.requires_grad:
            assert name not in groups, f'frozen {name} is in a group'
            numel['frozen'] += param.numel()
            continue
        assert name in groups, f'trainable {name} is in no group'
        seen.setdefault(kind, []).append(name)
        want = 0.0 if kind in NO_DECAY else base_wd
        got = groups[name]['weight_decay']
        if got != pytest.approx(want):
            wrong.append(f'{name} ({kind}): weight_decay {got}, '
                         f'expected {want}')
        numel['no_decay' if want == 0 else 'decay'] += param.numel()
    assert not wrong, '\n'.join(wrong)
    for group in wrapper.optimizer.param_groups:
        assert all(p.requires_grad for p in group['params'])
    return dict(kinds=seen, numel=numel)


def plain_wrapper(optim_wrapper: Config) -> dict:
    """The recipe's optimiser and ``paramwise_cfg`` under a plain
    ``OptimWrapper`` (``AmpOptimWrapper`` needs a GPU; the groups come from
    the constructor either way)."""
    cfg = copy.deepcopy(optim_wrapper.to_dict())
    cfg['type'] = 'OptimWrapper'
    for key in ('dtype', 'loss_scale'):
        cfg.pop(key, None)
    return cfg


# ------------------------------------------------ the real-scale recipe ---
VIT_DEPTH, CLIP_DEPTH, SAM_DEPTH, SAM_GLOBAL = 4, 2, 2, [1]


@pytest.fixture(scope='module')
def recipe_model(tmp_path_factory):
    """The real recipe's KnowledgeInheritance (teachers from official-layout
    files, fewer blocks)."""
    from kiv.testing.official_layouts import (OFFICIAL_FILES, write_clip,
                                              write_dinov2, write_mmdet,
                                              write_sam)
    cfg = Config.fromfile(RECIPE)
    root = tmp_path_factory.mktemp('official')
    paths = {k: str(root / f.filename) for k, f in OFFICIAL_FILES.items()}
    teachers = cfg.model.teachers
    write_dinov2(paths['dinov2'], depth=VIT_DEPTH)
    write_clip(paths['clip'], depth=CLIP_DEPTH)
    write_sam(paths['sam'], depth=SAM_DEPTH, global_attn_indexes=SAM_GLOBAL)
    write_mmdet(paths['detector'], teachers.detector.source.config)
    kwargs = dict(dinov2=dict(depth=VIT_DEPTH), clip=dict(depth=CLIP_DEPTH),
                  sam=dict(depth=SAM_DEPTH, global_attn_indexes=SAM_GLOBAL))
    for name, teacher in teachers.items():
        teacher.source.checkpoint = paths[name]
        if name in kwargs:
            teacher.source.model_kwargs.update(kwargs[name])
    student = cfg.model.student
    assert osp.basename(student.base.checkpoint) == \
        OFFICIAL_FILES['dinov2'].filename  # the student is built on it
    student.base.checkpoint = paths['dinov2']
    student.base.model_kwargs = dict(depth=VIT_DEPTH)
    student.interaction_indexes = [[i, i] for i in range(VIT_DEPTH)]
    model = ROOT_MODELS.build(cfg.model)
    return cfg, model


@pytest.mark.slow
def test_real_recipe_decays_only_ordinary_weights(recipe_model):
    cfg, model = recipe_model
    base_lr = cfg.optim_wrapper.optimizer.lr
    base_wd = cfg.optim_wrapper.optimizer.weight_decay
    assert base_wd > 0
    wrapper = build_optim_wrapper(model, plain_wrapper(cfg.optim_wrapper))
    found = check_decay(model, wrapper, base_wd)
    kinds = found['kinds']
    # every kind the schedule names is there (no vacuous pass)
    assert {'gate', 'level_embed', 'latent_query', 'skip', 'norm', 'bias',
            'weight'} <= set(kinds), sorted(kinds)
    assert len([n for n in kinds['gate'] if 'pyramid_gammas.' in n]) == 4
    assert len([n for n in kinds['gate'] if 'injector.gamma' in n]) == 4
    # the base teacher's preserved heads: summary + its dense level
    skip_weights = sorted(n for n in kinds['skip'] if n.endswith('weight'))
    assert skip_weights == ['latent.feature_heads.dinov2.0.skip.weight',
                            'latent.summary_heads.dinov2.skip.weight']
    # the ordinary weights: adapter, attention pools, every s2t head
    weights = kinds['weight']
    for part in ('student.spm.', 'student.interactions.0.injector.attn.',
                 'student.interactions.3.extractor.ffn.', 'student.up.',
                 'latent.summary_heads.clip.fc1.',
                 'latent.feature_heads.sam.0.fc2.',
                 'latent.feature_heads.dinov2.0.fc1.'):
        assert any(n.startswith(part) for n in weights), part
    # frozen: the knowledge base and every teacher; no lr multipliers
    for name, param in model.named_parameters():
        if name.startswith(('teachers.', 'student.base.')):
            assert not param.requires_grad, name
    assert {g['lr'] for g in wrapper.optimizer.param_groups} == {base_lr}
    assert found['numel']['decay'] > 0 and found['numel']['no_decay'] > 0
    # the schedule's grouped, fused AdamW: one group per set of options,
    # not one per tensor (decayed; no decay; the custom keys' no decay,
    # which mmengine annotates with ``decay_mult``)
    assert len(wrapper.optimizer.param_groups) == 3
    assert wrapper.optimizer.defaults['fused']


@pytest.mark.parametrize('recipe', [RECIPE, TINY_DISTILL_CFG])
def test_cached_recipes_use_the_same_rule(recipe):
    """The teacher-feature-cache variants train with the same groups."""
    cached = Config.fromfile(recipe.replace('.py', '_cached.py'))
    assert cached.optim_wrapper.paramwise_cfg == \
        Config.fromfile(recipe).optim_wrapper.paramwise_cfg
    assert Config.fromfile(TINY_DISTILL_CFG).optim_wrapper.paramwise_cfg \
        == Config.fromfile(RECIPE).optim_wrapper.paramwise_cfg


# ------------------------------------------------ the tiny distillation ---
def test_tiny_distillation_decays_only_ordinary_weights(distill_workdir):
    cfg = Config.fromfile(TINY_DISTILL_CFG)
    model = ROOT_MODELS.build(cfg.model)
    base_wd = cfg.optim_wrapper.optimizer.weight_decay
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    kinds = check_decay(model, wrapper, base_wd)['kinds']
    assert {'gate', 'level_embed', 'latent_query', 'skip', 'norm', 'bias',
            'weight'} <= set(kinds), sorted(kinds)
    assert len([n for n in kinds['gate'] if 'pyramid_gammas.' in n]) == 4
    assert any(n.endswith('skip.weight') for n in kinds['skip'])


# ------------------------------------------------------------- the demo ---
def test_demo_knowledge_base_layerscale_is_not_decayed(kiv_demo):
    """The demo's DINOv2-like knowledge base trains every weight, its
    LayerScale too."""
    from kiv_demo.recipes import load_cfg
    cfg = load_cfg('knowledge_base')
    student = cfg.model.student.to_dict()
    student['base']['model_kwargs'].update(depth=2)
    model = nn.ModuleDict(dict(student=ROOT_MODELS.build(student)))
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    kinds = check_decay(model, wrapper,
                        cfg.optim_wrapper.optimizer.weight_decay)['kinds']
    assert len(kinds['layerscale']) == 4  # ls1 and ls2 of 2 blocks
    assert {'norm', 'bias', 'weight'} <= set(kinds)


# ------------------------------------------------------- downstream ---
DOWNSTREAM = {
    # the real ImageNet fine-tune (ViT-B/14, base weights not loaded)
    'mmpretrain': ('mmpretrain',
                   'kiv-adapter-vit-b14_8xb128-coslr-100e_in1k.py'),
    # the tiny versions keep their real configs' optim_wrapper
    'mmdet': ('mmdet', 'mask-rcnn_kiv-adapter-vit-t14_fpn_1xb1-2it_'
              'tiny-coco.py'),
    'mmseg': ('mmseg', 'upernet_kiv-adapter-vit-t14_1xb2-2it_'
              'tiny-ade20k-48x48.py'),
}


def _register(scope: str) -> None:
    """The toolbox's modules registered (not its default scope)."""
    import importlib
    importlib.import_module('kiv.engine.optimizers.layer_decay_constructor')
    importlib.import_module(f'{scope}.utils').register_all_modules(
        init_default_scope=False)


@pytest.mark.parametrize('name', list(DOWNSTREAM))
def test_downstream_fine_tune_keeps_layer_decay_and_no_decay_rule(name):
    from mmengine.registry import DefaultScope
    scope, file = DOWNSTREAM[name]
    cfg = Config.fromfile(osp.join(REPO, 'configs', scope, file))
    _register(scope)
    optim = plain_wrapper(cfg.optim_wrapper)
    with DefaultScope.overwrite_default_scope(scope):
        model = ROOT_MODELS.build(cfg.model)
        wrapper = build_optim_wrapper(model, optim)
    paramwise = optim['paramwise_cfg']
    base_lr = optim['optimizer']['lr']
    found = check_decay(model, wrapper, optim['optimizer']['weight_decay'])
    kinds = found['kinds']
    assert {'gate', 'level_embed', 'norm', 'bias', 'weight'} <= set(kinds), \
        sorted(kinds)
    if cfg.model.backbone.get('with_global_token', True):
        assert 'latent_query' in kinds, sorted(kinds)
    if not cfg.model.backbone.get('freeze_base', True):
        assert {'layerscale', 'token'} <= set(kinds), sorted(kinds)
    # layer-wise lr decay: every group at lr * rate ** (L - 1 - layer id)
    rate = paramwise['layer_decay_rate']
    assert rate < 1
    if hasattr(model, 'get_layer_depth'):
        depth = model.get_layer_depth
    else:
        def depth(param_name):
            return model.backbone.get_layer_depth(param_name, 'backbone.')
    groups = groups_by_name(model, wrapper)
    lrs = set()
    for param_name, group in groups.items():
        layer_id, num_layers = depth(param_name)
        expect = base_lr * rate ** (num_layers - 1 - layer_id)
        assert group['lr'] == pytest.approx(expect), param_name
        lrs.add(round(group['lr'] / base_lr, 12))
    assert len(lrs) >= 4 and min(lrs) < max(lrs) == 1.0, sorted(lrs)
