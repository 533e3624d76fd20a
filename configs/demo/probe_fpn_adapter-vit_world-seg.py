# Downstream semantic segmentation with a frozen inherited student: FPN neck
# and head trained on the demo world (ADE20K layout), evaluated with mmseg's
# IoUMetric (mIoU). The demo sets ``init_cfg.checkpoint`` to each row's
# exported student.
_base_ = ['./_base_/world_fpn-seg.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='kiv.AdapterViT',
        base=dict(
            type='timm',
            model_name='vit_small_patch14_reg4_dinov2',
            checkpoint=None,
            model_kwargs=dict(img_size=64, patch_size=8, embed_dim=128,
                              depth=6, num_heads=4, init_values=0.1)),
        interaction_indexes=[[0, 0], [1, 2], [3, 4], [5, 5]],
        conv_inplane=32,
        deform_num_heads=4,
        n_points=4,
        freeze_base=True,
        frozen_stages=5,
        out_type='pyramid',
        init_cfg=dict(type='Pretrained',
                      checkpoint='inherit/student.pth')),
    neck=dict(in_channels=[128, 128, 128, 128]))
