# Importing kiv into an existing mmdet project: mmdet's own Mask R-CNN R-50
# 1x config, unmodified, with the kiv student as its backbone. These lines
# are all it takes; the data, heads, SGD recipe and schedule stay mmdet's.
# (The tuned recipe is ../mask-rcnn_kiv-adapter-vit-b14_fpn_8xb2-1x_coco.py.)
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['kiv'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,  # replace the ResNet-50 settings, do not merge
        type='kiv.AdapterViT',
        base=dict(type='timm', model_name='vit_base_patch14_reg4_dinov2'),
        deform_num_heads=12,
        deform_ratio=0.5,
        summary_names=['dinov2', 'clip'],
        init_cfg=dict(type='Pretrained',
                      checkpoint='checkpoints/kiv_vit-b14_student.pth')),
    neck=dict(in_channels=[768, 768, 768, 768]))
