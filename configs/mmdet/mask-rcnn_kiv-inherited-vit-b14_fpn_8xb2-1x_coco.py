# Mask R-CNN on COCO 2017 (1x, box + mask AP) on the inherited student's
# maps in its detection teacher's space: kiv.InheritedBackbone wraps the
# student of mask-rcnn_kiv-adapter-vit-b14_fpn_8xb2-1x_coco.py and gives
# mmdet's FPN, instead of the adapter's pyramid, the student's copy of the
# recipe's Mask R-CNN teacher's FPN (student -> s2t heads -> inverse
# standardisation; 5 levels P2-P6, 256 channels). Everything else is that
# config's (data, schedule, 8 GPUs x 2 images, fp16 AMP, layer-wise lr
# decay through the wrapper).
#   bash tools/dist_train.sh configs/mmdet/<this file> 8
# The student must be exported with its s2t heads:
#   tools/export_student.py <distillation checkpoint> \
#       checkpoints/kiv_vit-b14_student.pth --keep-heads
_base_ = [
    './mask-rcnn_kiv-adapter-vit-b14_fpn_8xb2-1x_coco.py',
    '../_base_/models/kiv_detector-space.py',  # the recipe's detector
]

student_checkpoint = 'checkpoints/kiv_vit-b14_student.pth'
model = dict(
    backbone=dict(
        # the recipe's detector (teacher, student_levels, scale_factors;
        # configs/_base_/models/kiv_detector-space.py): P2-P6
        _base_.kiv_detector_space_b14,
        _delete_=True,
        type='kiv.InheritedBackbone',
        backbone=_base_.model.backbone,
        checkpoint=student_checkpoint),
    neck=dict(in_channels=[256] * 5, num_outs=5))
