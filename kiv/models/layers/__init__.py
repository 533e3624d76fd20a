"""Building blocks shared by kiv's models, not specific to one of them."""
from .precision import autocast_enabled, fp32_compute

__all__ = ['autocast_enabled', 'fp32_compute']
