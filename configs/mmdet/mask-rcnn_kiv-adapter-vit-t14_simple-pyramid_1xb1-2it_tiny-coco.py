# Tiny CPU version of
# mask-rcnn_kiv-adapter-vit-b14_simple-pyramid_8xb2-1x_coco.py (see
# mask-rcnn_kiv-adapter-vit-t14_fpn_1xb1-2it_tiny-coco.py for the student
# and the data): the tiny student's stride-16 map -> kiv.SimplePyramid ->
# ViTDet-style heads, small sizes, 2 iterations.
_base_ = './mask-rcnn_kiv-adapter-vit-t14_fpn_1xb1-2it_tiny-coco.py'

norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN is GPU-only
model = dict(
    neck=dict(
        _delete_=True,
        type='kiv.SimplePyramid',
        in_channels={{_base_.width}},
        out_channels=32,
        in_index=2,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        num_outs=5,
        norm_cfg=norm_cfg),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=32,
            norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))
