"""Shared latent space: target standardisers and student-to-teacher heads."""
from .rotations import equalizing_rotation, hadamard_matrix
from .s2t_heads import DenseS2THead, S2THead
from .shared_latent_space import SharedLatentSpace
from .simple_pyramid import SimplePyramid
from .standardizers import (STANDARDIZE_MODES, BaseStandardizer,
                            ChannelStandardizer, EMAStandardizer,
                            IdentityStandardizer, PHISStandardizer,
                            build_standardizer)

__all__ = [
    'SharedLatentSpace', 'S2THead', 'DenseS2THead', 'BaseStandardizer',
    'EMAStandardizer', 'IdentityStandardizer', 'ChannelStandardizer',
    'PHISStandardizer', 'STANDARDIZE_MODES', 'build_standardizer',
    'hadamard_matrix', 'equalizing_rotation', 'SimplePyramid'
]
