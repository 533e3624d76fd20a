"""The ``make demo`` pipeline (``tools/demo.py``): inherit a small vision
foundation model on CPU from a real pretrained classifier and teachers the
demo trains itself, on a procedural multi-task world and real photos.

Importing ``kiv.demo`` registers ``kiv.PlainViTStudent``,
``kiv.EfficientNetLite0`` (the teachers' pretrained backbone) and the demo's
multi-task / probe modules (``kiv.TaskHead``, ``kiv.MultiTaskModel``,
``kiv.FeaturePassthrough``, ``kiv.FeatureDataPreprocessor``,
``kiv.WorldViewLabels``, ``kiv.PackWorldInputs``, ``kiv.AttachFeatures``,
``kiv.IoUMetricWithSamples``). ``kiv`` does not import this package.
"""
from .effnet_backbone import EfficientNetLite0
from .multitask import (FeatureDataPreprocessor, FeaturePassthrough,
                        MultiTaskModel, TaskHead)
from .plain_vit import PlainViTStudent
from .presets import PRESETS, get_preset
from .probes import AttachFeatures, IoUMetricWithSamples
from .transforms import PackWorldInputs, WorldViewLabels

__all__ = ['PlainViTStudent', 'EfficientNetLite0', 'PRESETS', 'get_preset',
           'TaskHead', 'MultiTaskModel', 'FeaturePassthrough',
           'FeatureDataPreprocessor', 'WorldViewLabels', 'PackWorldInputs',
           'AttachFeatures', 'IoUMetricWithSamples']
