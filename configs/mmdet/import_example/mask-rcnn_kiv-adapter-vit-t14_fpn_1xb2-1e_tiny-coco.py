# The import example above (mask-rcnn_kiv-adapter-vit-b14_fpn_1x_coco.py) at
# CPU scale. Two kinds of overrides, nothing else:
# 1. the tiny student instead of ViT-B/14 (architecture of
#    configs/distill/kiv_adapter-vit-t14-reg4_1xb4-20it_tiny-coco-images.py;
#    set its exported file with
#    --cfg-options model.backbone.init_cfg.checkpoint=<student.pth>);
# 2. the tiny COCO layout of kiv.testing.make_tiny_coco: its 2 classes (the
#    dataset keeps only images of the named classes, and the heads' labels
#    index them) and 64-px images (mmdet's 1333x800 resize would upsample
#    them 12x); 1 epoch of its 4 training images = 2 iterations of 2.
_base_ = './mask-rcnn_kiv-adapter-vit-b14_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        base=dict(
            model_name='vit_small_patch14_reg4_dinov2',
            model_kwargs=dict(img_size=56, embed_dim=64, depth=4,
                              num_heads=2)),
        interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
        conv_inplane=16,
        deform_num_heads=2,
        n_points=2,
        deform_ratio=1.0,
        init_cfg=dict(checkpoint='checkpoints/kiv_vit-t14_tiny_student.pth')),
    neck=dict(in_channels=[64, 64, 64, 64]),
    roi_head=dict(
        bbox_head=dict(num_classes=2), mask_head=dict(num_classes=2)))

metainfo = dict(classes=('class0', 'class1'))
resize = dict(type='Resize', scale=(64, 64), keep_ratio=True)
train_dataloader = dict(
    dataset=dict(
        metainfo=metainfo,
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
            resize,
            dict(type='RandomFlip', prob=0.5),
            dict(type='PackDetInputs'),
        ]))
val_dataloader = dict(
    dataset=dict(
        metainfo=metainfo,
        pipeline=[
            dict(type='LoadImageFromFile'),
            resize,
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
            dict(type='PackDetInputs',
                 meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                            'scale_factor')),
        ]))
test_dataloader = val_dataloader
train_cfg = dict(max_epochs=1)
