"""The ``make demo`` pipeline (``tools/demo.py``): inherit a small vision
foundation model on CPU from a real pretrained classifier and teachers the
demo trains itself, on a procedural multi-task world and real photos.

A project beside kiv (``projects/kiv_demo``, not installed with kiv): it
imports kiv as any user would and registers its own modules in its own
scope (:mod:`kiv_demo.registry`): ``kiv_demo.PlainViTStudent``,
``kiv_demo.EfficientNetLite0`` (the teachers' pretrained backbone) and the
multi-task / probe modules (``kiv_demo.TaskHead``,
``kiv_demo.MultiTaskModel``, ``kiv_demo.FeaturePassthrough``,
``kiv_demo.FeatureDataPreprocessor``, ``kiv_demo.WorldViewLabels``,
``kiv_demo.PackWorldInputs``, ``kiv_demo.AttachFeatures``,
``kiv_demo.IoUMetricWithSamples``, ``kiv_demo.LabelledShareSampler``).
``tools/demo.py`` puts ``projects/kiv_demo`` on the import path; ``kiv``
never imports this package.
"""
from .effnet_backbone import EfficientNetLite0
from .multitask import (FeatureDataPreprocessor, FeaturePassthrough,
                        MultiTaskModel, TaskHead)
from .plain_vit import PlainViTStudent
from .presets import PRESETS, get_preset
from .probes import AttachFeatures, IoUMetricWithSamples
from .samplers import LabelledShareSampler
from .transforms import PackWorldInputs, WorldViewLabels

__all__ = ['PlainViTStudent', 'EfficientNetLite0', 'PRESETS', 'get_preset',
           'TaskHead', 'MultiTaskModel', 'FeaturePassthrough',
           'FeatureDataPreprocessor', 'WorldViewLabels', 'PackWorldInputs',
           'AttachFeatures', 'IoUMetricWithSamples', 'LabelledShareSampler']
