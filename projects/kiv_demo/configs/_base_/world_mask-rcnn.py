# Mask R-CNN on the demo world (COCO layout, 64x64 images, 6 shape
# classes, at most 4 objects per image) for any backbone giving 4 maps at
# strides 4/8/16/32: small anchors (16 px at stride 4), light heads and
# proposal / RoI budgets sized for a few objects per 64 px image. Paths
# are relative to the demo work dir (``work_dirs/demo``), where
# ``world/coco`` is written.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['kiv'], allow_failed_imports=False)
# a NaN/Inf loss is skipped before it reaches the weights, under any
# entry point (docs/reliability.md)
custom_hooks = [dict(type='kiv.NonFiniteLossHook')]

data_root = 'world/coco/'
metainfo = dict(
    classes=('disc', 'square', 'triangle', 'star', 'ring', 'cross'))
img_scale = (64, 64)
fpn_channels = 64
model = dict(
    neck=dict(out_channels=fpn_channels, num_outs=5),
    rpn_head=dict(
        in_channels=fpn_channels,
        feat_channels=fpn_channels,
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        # mmcv's CPU RoIAlign (scalar loops; its backward scatters corner by
        # corner) took about a third of a probe's step; kiv's is one
        # weighted gather with the same sampling (docs/performance.md)
        bbox_roi_extractor=dict(
            type='kiv.SingleRoIExtractor',
            roi_layer=dict(type='kiv.RoIAlign', output_size=7,
                           sampling_ratio=0),
            out_channels=fpn_channels),
        bbox_head=dict(in_channels=fpn_channels, fc_out_channels=128,
                       num_classes=6),
        mask_roi_extractor=dict(
            type='kiv.SingleRoIExtractor',
            roi_layer=dict(type='kiv.RoIAlign', output_size=14,
                           sampling_ratio=0),
            out_channels=fpn_channels),
        mask_head=dict(num_convs=2, in_channels=fpn_channels,
                       conv_out_channels=fpn_channels, num_classes=6)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=64)),
        rpn_proposal=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100),
                  rcnn=dict(max_per_img=20)))

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
    batch_size=8, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

train_cfg = dict(type='IterBasedTrainLoop', max_iters=300, val_interval=10**9)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    # fused AdamW: all tensors of the (one) parameter group in one kernel
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05, fused=True),
    clip_grad=dict(max_norm=10.0))
# warm-up, then cosine decay (the demo stretches both to its iterations)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=False, begin=30,
         end=300),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', interval=10**9, by_epoch=False,
                    save_last=False))
log_processor = dict(by_epoch=False)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
