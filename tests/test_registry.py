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
