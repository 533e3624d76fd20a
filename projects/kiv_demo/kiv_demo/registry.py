"""The demo's registries: scope ``kiv_demo``, beside kiv's.

The demo uses kiv as any user project would: its own modules (the demo
world's transforms, its multi-task model and probe pieces, its ViT and
EfficientNet backbones) are registered here, never in kiv's scope. Every
registry is a child of the corresponding mmengine root registry (as
``kiv.registry``'s are), so configs of every scope reach a demo module as
``type='kiv_demo.<Name>'`` once ``kiv_demo`` is importable, e.g. with
``custom_imports=dict(imports=['kiv', 'kiv_demo'])``.
"""
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

__all__ = ['MODELS', 'TRANSFORMS', 'METRICS']

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='kiv_demo',
                  locations=['kiv_demo'])
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS,
                      scope='kiv_demo', locations=['kiv_demo'])
METRICS = Registry('metric', parent=MMENGINE_METRICS, scope='kiv_demo',
                   locations=['kiv_demo'])
