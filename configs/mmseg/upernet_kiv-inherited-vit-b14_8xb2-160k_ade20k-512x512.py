# UperNet on ADE20K (512x512 crops, 160k iterations, mIoU) on the inherited
# student's maps in its detection teacher's space: kiv.InheritedBackbone
# wraps the student of upernet_kiv-adapter-vit-b14_8xb2-160k_ade20k-512x512.py
# and gives UperNet, instead of the adapter's pyramid, the student's copy of
# the recipe's Mask R-CNN teacher's FPN (student -> s2t heads -> inverse
# standardisation; 256 channels). UperNet reads P2-P5 (strides 4-32), as it
# reads a ResNet's C2-C5. Everything else is that config's (data, schedule,
# 8 GPUs x 2 images, fp16 AMP, SyncBN, layer-wise lr decay through the
# wrapper). The student is fine-tuned as its config says (freeze_base=False);
# the s2t paths inside the wrapper stay fixed (the distillation's weights).
#   bash tools/dist_train.sh configs/mmseg/<this file> 8
#   bash tools/dist_test.sh configs/mmseg/<this file> <checkpoint> 8
# The student must be exported with its s2t heads:
#   tools/export_student.py <distillation checkpoint> \
#       checkpoints/kiv_vit-b14_student.pth --keep-heads
_base_ = [
    './upernet_kiv-adapter-vit-b14_8xb2-160k_ade20k-512x512.py',
    '../_base_/models/kiv_detector-space.py',  # the recipe's detector
]

teacher_channels = 256  # Mask R-CNN's FPN
model = dict(
    backbone=dict(
        # the recipe's detector (teacher, student_levels, scale_factors;
        # configs/_base_/models/kiv_detector-space.py); P2-P5 only
        # (P6 is neither built nor run)
        _base_.kiv_detector_space_b14,
        _delete_=True,
        type='kiv.InheritedBackbone',
        backbone=_base_.model.backbone,
        checkpoint=_base_.student,
        out_indices=[0, 1, 2, 3]),
    decode_head=dict(
        in_channels=[teacher_channels] * 4, in_index=[0, 1, 2, 3]),
    auxiliary_head=dict(
        in_channels=teacher_channels, in_index=2))  # P4, stride 16
