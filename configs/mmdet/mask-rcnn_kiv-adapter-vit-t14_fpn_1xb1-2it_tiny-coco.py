# Tiny CPU version of mask-rcnn_kiv-adapter-vit-b14_fpn_8xb2-1x_coco.py: the
# same model and evaluation with small sizes, 2 iterations, on the tiny COCO
# layout that kiv.testing.make_tiny_coco writes under data/coco (run from the
# directory holding data/). The student is the tiny one of
# configs/distill/kiv_adapter-vit-t14-reg4_1xb4-20it_tiny-coco-images.py,
# exported with tools/export_student.py; set its path with
#   --cfg-options model.backbone.init_cfg.checkpoint=<student.pth>
_base_ = [
    './mask-rcnn_kiv-adapter-vit-b14_fpn_8xb2-1x_coco.py',
    '../_base_/models/kiv_adapter-vit-t14-reg4.py',  # the tiny student
]

student_checkpoint = 'checkpoints/kiv_vit-t14_tiny_student.pth'
width = _base_.kiv_student_t14.base.model_kwargs.embed_dim  # 64
metainfo = dict(classes=('class0', 'class1'))
img_scale = (64, 64)
model = dict(
    backbone=dict(
        # every architecture key of the tiny student replaces ViT-B/14's
        _base_.kiv_student_t14,
        base=dict(_base_.kiv_student_t14.base, _delete_=True,
                  checkpoint=None),
        drop_path_rate=0.0,
        with_cp=False,
        norm_cfg=dict(type='BN', requires_grad=True),  # SyncBN is GPU-only
        init_cfg=dict(checkpoint=student_checkpoint)),
    neck=dict(in_channels=[width] * 4, out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=2),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32, num_classes=2)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor')),
]
train_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader

# fp32 on CPU (bf16/fp16 autocast only slows a CPU down)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer={{_base_.optim_wrapper.optimizer}},
    constructor={{_base_.optim_wrapper.constructor}},
    paramwise_cfg={{_base_.optim_wrapper.paramwise_cfg}})
train_cfg = dict(
    _delete_=True, type='IterBasedTrainLoop', max_iters=2, val_interval=1000)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=2)
]
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=2, by_epoch=False))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
