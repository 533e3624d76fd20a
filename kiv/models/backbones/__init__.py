"""The student backbone: a frozen base ViT with a trainable ViT-Adapter;
``InheritedBackbone`` gives a distilled student's maps in a teacher's space."""
from .adapter_modules import (ConvFFN, DeformInputs, Extractor, GlobalToken,
                              Injector, InteractionBlock, SpatialPriorModule,
                              make_deform_inputs)
from .adapter_vit import AdapterViT
from .base_vit import BaseViT, MMPretrainBaseViT, TimmBaseViT, build_base_vit
from .inherited_backbone import InheritedBackbone

__all__ = [
    'AdapterViT', 'InheritedBackbone', 'BaseViT', 'TimmBaseViT',
    'MMPretrainBaseViT', 'build_base_vit', 'SpatialPriorModule',
    'Injector', 'Extractor', 'ConvFFN', 'InteractionBlock', 'GlobalToken',
    'DeformInputs', 'make_deform_inputs'
]
