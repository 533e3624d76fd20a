"""The ``make demo`` pipeline (``tools/demo.py``): inherit a small vision
foundation model on CPU from a real pretrained classifier and teachers the
demo trains itself, on a procedural multi-task world and real photos.

Importing ``kiv.demo`` registers ``kiv.PlainViTStudent``. ``kiv`` does not
import this package.
"""
from .plain_vit import PlainViTStudent
from .presets import PRESETS, get_preset

__all__ = ['PlainViTStudent', 'PRESETS', 'get_preset']
