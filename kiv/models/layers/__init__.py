"""Building blocks shared by kiv's models, not specific to one of them:
multi-scale deformable attention and its sampling kernel, RoIAlign on CPU
(both weighted gathers of table rows), latent-query
attention pooling, a backbone's input / output geometry, and IEEE float32
compute under mixed precision."""
from .attention_pool import latent_attention_pool
from .backbone_io import (OUT_TYPES, STRIDES, check_images, check_outputs,
                          crop_to, pad_to_patch_multiple,
                          pretrained_to_init_cfg, pyramid_sizes)
from .deform_attention import MSDeformAttn, ms_deform_attn
from .deform_sampling import (deform_sampling_points_major,
                              ms_deform_attn_sampling)
from .precision import autocast_enabled, fp32_compute
from .roi_align import RoIAlign, roi_align
from .weighted_gather import transposed_gather, weighted_gather

__all__ = [
    'MSDeformAttn', 'ms_deform_attn', 'deform_sampling_points_major',
    'ms_deform_attn_sampling', 'latent_attention_pool', 'OUT_TYPES',
    'STRIDES', 'check_images', 'check_outputs', 'crop_to',
    'pad_to_patch_multiple', 'pretrained_to_init_cfg', 'pyramid_sizes',
    'autocast_enabled', 'fp32_compute', 'RoIAlign', 'roi_align',
    'transposed_gather', 'weighted_gather'
]
