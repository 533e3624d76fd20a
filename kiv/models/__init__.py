"""kiv models, laid out as the method: ``teachers`` (frozen, any source),
``connectors`` (the shared latent space: standardisers, s2t heads),
``backbones`` (the student: frozen base ViT + zero-initialised adapter;
a distilled student's maps in a teacher's space),
``layers`` (building blocks), ``distillers`` (knowledge inheritance),
``losses`` and ``necks`` (downstream). Importing this package registers them
all in ``kiv.MODELS``; every public class is importable from here.
``heads`` (zero-shot heads on the inherited CLIP path, ``kiv.ZeroShotClsHead``
for mmpretrain and ``kiv.TextSegHead`` for mmseg; ``kiv.SingleRoIExtractor``
for mmdet) import those toolboxes, so
``import kiv`` leaves them out: ``kiv.MODELS`` imports them on its first
lookup.
"""
from .backbones import (AdapterViT, BaseViT, ConvFFN, DeformInputs,
                        Extractor, GlobalToken, InheritedBackbone, Injector,
                        InteractionBlock, MMPretrainBaseViT,
                        SpatialPriorModule, TimmBaseViT)
from .connectors import (BaseStandardizer, ChannelStandardizer, DenseS2THead,
                         IdentityStandardizer, InheritedPath,
                         InheritedPathError, PHISStandardizer, S2THead,
                         SharedLatentSpace, StatisticsStandardizer)
from .distillers import KnowledgeInheritance
from .layers import MSDeformAttn, RoIAlign
from .losses import FeatureMatchingLoss, LogitDistillationLoss
from .necks import SimplePyramid
from .teachers import (BackboneNeck, CachedTeacher, HFVisionModel,
                       ModuleOutputsRecorder, Teacher, TeacherCheckpointError)

__all__ = [
    'AdapterViT', 'InheritedBackbone', 'BaseViT', 'TimmBaseViT',
    'MMPretrainBaseViT', 'SpatialPriorModule', 'Injector', 'Extractor',
    'ConvFFN', 'InteractionBlock', 'GlobalToken', 'DeformInputs',
    'SharedLatentSpace', 'S2THead', 'DenseS2THead', 'InheritedPath',
    'InheritedPathError', 'BaseStandardizer', 'StatisticsStandardizer',
    'IdentityStandardizer', 'ChannelStandardizer', 'PHISStandardizer',
    'KnowledgeInheritance', 'MSDeformAttn', 'RoIAlign',
    'FeatureMatchingLoss', 'LogitDistillationLoss', 'SimplePyramid',
    'Teacher', 'CachedTeacher', 'BackboneNeck', 'HFVisionModel',
    'ModuleOutputsRecorder', 'TeacherCheckpointError'
]
