# Semantic FPN on the demo world (ADE20K layout: label 0 = background is
# ignored via ``reduce_zero_label`` exactly like ADE20K; 6 shape classes).
# The images are 64x64; backbones give 4 maps at strides 4/8/16/32. Paths
# are relative to the demo work dir, where ``world/ade`` is written.
_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    'mmseg::_base_/default_runtime.py',
]
custom_imports = dict(imports=['kiv'], allow_failed_imports=False)
# a NaN/Inf loss is skipped before it reaches the weights, under any
# entry point (docs/reliability.md)
custom_hooks = [dict(type='kiv.NonFiniteLossHook')]

data_root = 'world/ade/ADEChallengeData2016/'
metainfo = dict(
    classes=('disc', 'square', 'triangle', 'star', 'ring', 'cross'))
crop_size = (64, 64)
norm_cfg = dict(type='BN', requires_grad=True)
fpn_channels = 64
model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    neck=dict(out_channels=fpn_channels),
    decode_head=dict(in_channels=[fpn_channels] * 4, channels=64,
                     num_classes=6, norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
dataset = dict(
    type='BaseSegDataset', data_root=data_root, metainfo=metainfo,
    img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True)
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        **dataset,
        data_prefix=dict(img_path='images/training',
                         seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        **dataset,
        data_prefix=dict(img_path='images/validation',
                         seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
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
