"""The student backbone: a frozen base ViT with a trainable ViT-Adapter."""
from .adapter_modules import (ConvFFN, DeformInputs, Extractor, GlobalToken,
                              Injector, InteractionBlock, SpatialPriorModule,
                              make_deform_inputs)
from .adapter_vit import AdapterViT
from .base_vit import BaseViT, MMPretrainBaseViT, TimmBaseViT, build_base_vit

__all__ = [
    'AdapterViT', 'BaseViT', 'TimmBaseViT', 'MMPretrainBaseViT',
    'build_base_vit', 'SpatialPriorModule', 'Injector', 'Extractor',
    'ConvFFN', 'InteractionBlock', 'GlobalToken', 'DeformInputs',
    'make_deform_inputs'
]
