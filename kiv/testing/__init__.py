"""Helpers of kiv's tests and CPU smoke runs.

Tiny datasets in the exact real layouts (COCO, ADE20K, ImageNet) for the
downstream configs and ``tools/test.py`` (exported here); in submodules:
``paths`` (the source checkout's configs, a working-directory switch),
``tools`` (kiv's tools run in a subprocess, the toy engine config),
``toy_engine``, ``tiny_teachers``, ``tiny_classifier``, ``tiny_cache``,
``official_layouts`` and ``layouts``.
"""
from .tiny_datasets import make_tiny_ade20k, make_tiny_coco, make_tiny_imagenet

__all__ = ['make_tiny_coco', 'make_tiny_ade20k', 'make_tiny_imagenet']
