# Tiny CPU version of mask-rcnn_kiv-inherited-vit-b14_fpn_8xb2-1x_coco.py:
# the tiny FPN config's student wrapped in kiv.InheritedBackbone with the
# tiny recipe's detector teacher (a tiny RetinaNet: 3 FPN levels at strides
# 8/16/32, 32 channels), 2 iterations on the tiny COCO layout. Set the
# exported student and the file holding its s2t heads (an export with
# --keep-heads, or the distillation checkpoint) with
#   --cfg-options model.backbone.backbone.init_cfg.checkpoint=<student.pth> \
#       model.backbone.checkpoint=<student.pth or iter_N.pth>
_base_ = [
    './mask-rcnn_kiv-adapter-vit-t14_fpn_1xb1-2it_tiny-coco.py',
    '../_base_/models/kiv_detector-space.py',  # the recipe's detector
]

model = dict(
    backbone=dict(
        _base_.kiv_detector_space_t14,  # the tiny recipe's detector
        _delete_=True,
        type='kiv.InheritedBackbone',
        backbone=_base_.model.backbone,
        checkpoint=_base_.student_checkpoint),
    neck=dict(in_channels=[32] * 3),
    # the teacher's strides: 8, 16, 32 (+ 2 extra levels from the FPN)
    rpn_head=dict(anchor_generator=dict(strides=[8, 16, 32, 64, 128])),
    roi_head=dict(
        bbox_roi_extractor=dict(featmap_strides=[8, 16, 32, 64]),
        mask_roi_extractor=dict(featmap_strides=[8, 16, 32, 64])))
