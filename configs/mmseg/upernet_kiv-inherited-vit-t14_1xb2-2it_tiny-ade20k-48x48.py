# Tiny CPU version of
# upernet_kiv-inherited-vit-b14_8xb2-160k_ade20k-512x512.py: the student of
# upernet_kiv-adapter-vit-t14_1xb2-2it_tiny-ade20k-48x48.py wrapped in
# kiv.InheritedBackbone with the tiny recipe's detector teacher (a tiny
# RetinaNet: 3 FPN levels at strides 8/16/32, 32 channels), 2 iterations on
# the tiny ADE20K layout, 48x48 crops. UperNet reads the 3 levels (the head
# then predicts at stride 8), the auxiliary head the stride-16 one. UperNet's
# pool_scales (1, 2, 3, 6) stay: its PPM pools the stride-32 level, 2x2 at
# 48 px, and torch's adaptive average pooling gives the 3x3 and 6x6 bins of
# a 2x2 map too (batch 2 keeps the BN of the 1x1 bin defined in training).
# Set the exported student and the file holding its s2t heads (an export
# with --keep-heads, or the distillation checkpoint) with
#   --cfg-options model.backbone.backbone.init_cfg.checkpoint=<student.pth> \
#       model.backbone.checkpoint=<student.pth or iter_N.pth>
_base_ = [
    './upernet_kiv-adapter-vit-t14_1xb2-2it_tiny-ade20k-48x48.py',
    '../_base_/models/kiv_detector-space.py',  # the recipe's detector
]

teacher_channels = 32  # the tiny RetinaNet's FPN
model = dict(
    backbone=dict(
        _base_.kiv_detector_space_t14,  # the tiny recipe's: strides 8-32
        _delete_=True,
        type='kiv.InheritedBackbone',
        backbone=_base_.model.backbone,
        checkpoint=_base_.model.backbone.init_cfg.checkpoint),
    decode_head=dict(
        in_channels=[teacher_channels] * 3, in_index=[0, 1, 2]),
    auxiliary_head=dict(
        in_channels=teacher_channels, in_index=1))  # stride 16
