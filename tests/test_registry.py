"""kiv modules are reachable as ``type='kiv.<Name>'`` from every toolbox."""
import pytest
import torch
from mmengine.registry import MODELS as MMENGINE_MODELS

import kiv  # noqa: F401
from kiv.registry import HOOKS, MODELS, TRANSFORMS


def _toolbox_registry(scope: str):
    if scope == 'mmdet':
        from mmdet.registry import MODELS as reg
    elif scope == 'mmseg':
        from mmseg.registry import MODELS as reg
    else:
        from mmpretrain.registry import MODELS as reg
    return reg


@pytest.mark.parametrize('scope', ['mmpretrain', 'mmdet', 'mmseg'])
def test_build_kiv_module_from_toolbox_registry(scope):
    reg = _toolbox_registry(scope)
    assert reg.scope == scope
    loss = reg.build(dict(type='kiv.FeatureMatchingLoss', cosine_weight=1.0))
    assert type(loss).__module__.startswith('kiv.')
    x = torch.randn(2, 8)
    assert loss(x, x).abs().item() < 1e-6
    assert loss(x, -x).item() > 1.0


def test_registries_are_children_of_mmengine_root():
    assert MODELS.scope == 'kiv'
    assert MODELS.parent is MMENGINE_MODELS
    assert MMENGINE_MODELS.children['kiv'] is MODELS
    assert HOOKS.get('SafeCheckpointHook') is not None
    assert TRANSFORMS.get('PackImageInputs') is not None


def test_unscoped_name_resolves_to_toolbox_own_class():
    """An unscoped name is the toolbox's class, never silently kiv's."""
    from mmdet.registry import MODELS as DET
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):
        cls = DET.get('ResNet')
    assert cls.__module__.startswith('mmdet.')


#: the demo's modules (projects/kiv_demo), by registry
DEMO_NAMES = {
    'MODELS': ('EfficientNetLite0', 'FeaturePassthrough',
               'FeatureDataPreprocessor', 'TaskHead', 'MultiTaskModel',
               'PlainViTStudent'),
    'TRANSFORMS': ('WorldViewLabels', 'PackWorldInputs', 'AttachFeatures'),
    'METRICS': ('IoUMetricWithSamples', ),
}


def test_kiv_scope_holds_no_demo_module(kiv_demo):
    """The demo registers in its own scope: kiv's registries hold none of
    its names, even once the demo is imported."""
    from kiv import registry as kiv_registry
    names = {n for group in DEMO_NAMES.values() for n in group}
    for reg_name in kiv_registry.__all__:
        reg = getattr(kiv_registry, reg_name)
        assert not names & set(reg.module_dict), reg_name
    for reg_name, group in DEMO_NAMES.items():
        reg = getattr(kiv_registry, reg_name)
        for name in group:
            assert reg.get(f'kiv.{name}') is None, name


@pytest.mark.parametrize('scope', ['kiv', 'mmpretrain', 'mmdet', 'mmseg'])
def test_demo_modules_resolve_as_kiv_demo_names(kiv_demo, scope):
    """``type='kiv_demo.<Name>'`` reaches every demo module from kiv's and
    every toolbox's registries (scope ``kiv_demo`` is a child of mmengine's
    root registries, as ``kiv`` is)."""
    import importlib

    from mmengine import registry as mm_registry
    from kiv_demo import registry as demo_registry
    toolbox = importlib.import_module(f'{scope}.registry')
    for reg_name, group in DEMO_NAMES.items():
        demo = getattr(demo_registry, reg_name)
        assert demo.scope == 'kiv_demo'
        assert demo.parent is getattr(mm_registry, reg_name)
        assert getattr(mm_registry, reg_name).children['kiv_demo'] is demo
        assert set(group) <= set(demo.module_dict)
        for name in group:
            cls = getattr(toolbox, reg_name).get(f'kiv_demo.{name}')
            assert cls is demo.module_dict[name], (scope, name)
            assert cls.__module__.startswith('kiv_demo.')
