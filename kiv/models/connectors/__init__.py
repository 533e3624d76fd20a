"""Connectors: the shared latent space between the student and its
teachers (mmrazor's name for what sits between them): target
standardisers, student-to-teacher heads, the rotations of PHI-S, the
label-free calibration of inherited outputs, and the fixed inherited path of
one teacher output (s2t head + inverse standardisation) that downstream
modules read."""
from .calibration import InheritedStatistics, calibrate, calibration_affine
from .inherited_path import (InheritedPath, InheritedPathError,
                             read_latent_state)
from .rotations import equalizing_rotation, hadamard_matrix
from .s2t_heads import DenseS2THead, S2THead
from .shared_latent_space import SharedLatentSpace, all_reduce_sums
from .standardizers import (STANDARDIZE_MODES, BaseStandardizer,
                            ChannelStandardizer, IdentityStandardizer,
                            PHISStandardizer, StatisticsStandardizer,
                            build_standardizer)

__all__ = [
    'SharedLatentSpace', 'S2THead', 'DenseS2THead', 'BaseStandardizer',
    'StatisticsStandardizer', 'IdentityStandardizer', 'ChannelStandardizer',
    'PHISStandardizer', 'STANDARDIZE_MODES', 'build_standardizer',
    'hadamard_matrix', 'equalizing_rotation', 'all_reduce_sums',
    'InheritedPath', 'InheritedPathError', 'read_latent_state',
    'InheritedStatistics', 'calibrate', 'calibration_affine'
]
