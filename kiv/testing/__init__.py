"""Tiny datasets in the exact real layouts (COCO, ADE20K, ImageNet), for
tests and CPU smoke runs of the downstream configs and ``tools/test.py``."""
from .tiny_datasets import make_tiny_ade20k, make_tiny_coco, make_tiny_imagenet

__all__ = ['make_tiny_coco', 'make_tiny_ade20k', 'make_tiny_imagenet']
