# Downstream classification with a frozen inherited student: a linear head
# on the student's summary, trained on the demo world (ImageNet layout) and
# evaluated with mmpretrain's Accuracy (top-1). The demo sets
# ``init_cfg.checkpoint`` to each row's exported student.
_base_ = ['./_base_/world_cls.py']
model = dict(
    backbone=dict(
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
        out_type='global',
        init_cfg=dict(type='Pretrained',
                      checkpoint='inherit/student.pth')),
    head=dict(in_channels=128))
