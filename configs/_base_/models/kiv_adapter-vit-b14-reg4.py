# The kiv student, real size: DINOv2 ViT-B/14 with 4 registers (the frozen
# knowledge base) + ViT-Adapter (spatial prior, 4 interaction blocks,
# deformable attention) + a global token per summary teacher.
#
# Everything that shapes the student's state dict lives here, once: the
# distillation recipe uses it as `model.student`, every downstream config
# (mmpretrain, mmdet, mmseg) as `model.backbone`, so a student exported by
# tools/export_student.py loads into each of them key for key. A config
# inherits this file and adds its own task settings:
#   _base_ = [..., '../_base_/models/kiv_adapter-vit-b14-reg4.py']
#   model = dict(backbone=dict(
#       _base_.kiv_student_b14,
#       base=dict(_base_.kiv_student_b14.base, checkpoint=None),
#       out_type='pyramid', norm_cfg=..., init_cfg=...))
# Task settings stay in each config: the base's weights file and drop path,
# drop_path_rate, out_type, out_indices, freeze_base, frozen_stages, with_cp,
# norm_cfg, summary, init_cfg. tests/test_configs.py checks that every
# config building this student has exactly this architecture.
kiv_student_b14 = dict(
    type='kiv.AdapterViT',
    base=dict(type='timm', model_name='vit_base_patch14_reg4_dinov2'),
    interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
    conv_inplane=64,
    deform_num_heads=12,
    n_points=4,
    deform_ratio=0.5,
    with_cffn=True,
    cffn_ratio=0.25,
    use_extra_extractor=True,
    add_vit_feature=True,
    with_global_token=True,
    # a summary per teacher with one (CLIP's stays in its text space)
    summary_names=['dinov2', 'clip'])
