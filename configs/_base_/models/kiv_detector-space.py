# The recipes' detection teachers as the student predicts them, one place
# for the distillation recipes (latent.teachers.detector.student_levels) and
# the downstream configs on kiv.InheritedBackbone, so the two cannot drift
# apart: the teacher's name, the student map feeding each of its levels and
# each level's grid relative to that map.
# configs/distill/kiv_adapter-vit-b14-reg4_dinov2-clip-sam-maskrcnn_*.py:
# Mask R-CNN's FPN, P2-P6 (P6, stride 64, at half the stride-32 grid).
kiv_detector_space_b14 = dict(
    teacher='detector',
    student_levels=[0, 1, 2, 3, 3],
    scale_factors=[1, 1, 1, 1, 0.5])
# configs/distill/kiv_adapter-vit-t14-reg4_1xb4-20it_tiny-coco-images.py:
# a tiny RetinaNet's FPN, strides 8/16/32.
kiv_detector_space_t14 = dict(teacher='detector', student_levels=[1, 2, 3])
