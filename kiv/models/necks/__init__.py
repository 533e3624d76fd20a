"""Downstream necks on the student's pyramid."""
from .simple_pyramid import SimplePyramid

__all__ = ['SimplePyramid']
