"""kiv registries.

Every registry is a child of the corresponding mmengine root registry with
scope ``kiv``, like mmpretrain's/mmdet's ``registry.py``. Because the parent
is mmengine's root, any OpenMMLab toolbox (mmpretrain, mmdet, mmseg) reaches
a kiv class as ``type='kiv.<Name>'`` once ``kiv`` is imported, e.g. with
``custom_imports=dict(imports=['kiv'], allow_failed_imports=False)``.

``locations`` make the registries lazy: a kiv-scoped build imports the
modules that register into them.
"""
from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import EVALUATOR as MMENGINE_EVALUATOR
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOG_PROCESSORS as MMENGINE_LOG_PROCESSORS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import \
    OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import OPTIMIZERS as MMENGINE_OPTIMIZERS
from mmengine.registry import PARAM_SCHEDULERS as MMENGINE_PARAM_SCHEDULERS
from mmengine.registry import RUNNERS as MMENGINE_RUNNERS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import \
    WEIGHT_INITIALIZERS as MMENGINE_WEIGHT_INITIALIZERS
from mmengine.registry import Registry

__all__ = [
    'RUNNERS', 'LOOPS', 'HOOKS', 'LOG_PROCESSORS', 'OPTIMIZERS',
    'OPTIM_WRAPPERS', 'OPTIM_WRAPPER_CONSTRUCTORS', 'PARAM_SCHEDULERS',
    'DATASETS', 'DATA_SAMPLERS', 'TRANSFORMS', 'MODELS', 'MODEL_WRAPPERS',
    'WEIGHT_INITIALIZERS', 'METRICS', 'EVALUATOR', 'TEACHER_SOURCES'
]

RUNNERS = Registry('runner', parent=MMENGINE_RUNNERS, scope='kiv',
                   locations=['kiv.engine'])
LOOPS = Registry('loop', parent=MMENGINE_LOOPS, scope='kiv',
                 locations=['kiv.engine'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='kiv',
                 locations=['kiv.engine'])
LOG_PROCESSORS = Registry('log processor', parent=MMENGINE_LOG_PROCESSORS,
                          scope='kiv', locations=['kiv.engine'])
OPTIMIZERS = Registry('optimizer', parent=MMENGINE_OPTIMIZERS, scope='kiv',
                      locations=['kiv.engine'])
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS,
                          scope='kiv', locations=['kiv.engine'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor',
    parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
    scope='kiv',
    # imported on first lookup only: it imports mmpretrain
    locations=['kiv.engine',
               'kiv.engine.optimizers.layer_decay_constructor'])
PARAM_SCHEDULERS = Registry('parameter scheduler',
                            parent=MMENGINE_PARAM_SCHEDULERS, scope='kiv',
                            locations=['kiv.engine'])

DATASETS = Registry('dataset', parent=MMENGINE_DATASETS, scope='kiv',
                    locations=['kiv.datasets'])
DATA_SAMPLERS = Registry('data sampler', parent=MMENGINE_DATA_SAMPLERS,
                         scope='kiv', locations=['kiv.datasets'])
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS, scope='kiv',
                      locations=['kiv.datasets'])

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='kiv',
                  # the heads import mmpretrain's, mmseg's and mmdet's
                  # heads: imported on the first kiv model lookup, not by
                  # ``import kiv``
                  locations=['kiv.models', 'kiv.models.heads'])
MODEL_WRAPPERS = Registry('model_wrapper', parent=MMENGINE_MODEL_WRAPPERS,
                          scope='kiv', locations=['kiv.engine'])
WEIGHT_INITIALIZERS = Registry('weight initializer',
                               parent=MMENGINE_WEIGHT_INITIALIZERS,
                               scope='kiv', locations=['kiv.models'])

METRICS = Registry('metric', parent=MMENGINE_METRICS, scope='kiv',
                   locations=['kiv.evaluation'])
EVALUATOR = Registry('evaluator', parent=MMENGINE_EVALUATOR, scope='kiv',
                     locations=['kiv.evaluation'])


# Builders that turn a teacher ``source`` dict (timm / mm config / HF /
# torchvision / state dict) into a frozen ``nn.Module``. Not a child of an
# mmengine registry: sources are kiv's own concept.
TEACHER_SOURCES = Registry('teacher source', scope='kiv',
                           locations=['kiv.models.teachers'])
