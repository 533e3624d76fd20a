# Tiny CPU version of upernet_kiv-adapter-vit-b14_8xb2-160k_ade20k-512x512.py
# (inherited: same UperNet, layer-decay AdamW, schedule shape, mIoU), with
# the tiny student of
# configs/distill/kiv_adapter-vit-t14-reg4_1xb4-20it_tiny-coco-images.py
# (width 64, 4 blocks) on the tiny ADE20K layout written by
# kiv.testing.make_tiny_ade20k('data/ade') (classes 'wall', 'building').
# 48x48 crops, not a multiple of the patch 14, as 512 is not.
#   python tools/train.py configs/mmseg/<this file> \
#       --cfg-options model.backbone.init_cfg.checkpoint=<student.pth>
_base_ = [
    './upernet_kiv-adapter-vit-b14_8xb2-160k_ade20k-512x512.py',
    '../_base_/models/kiv_adapter-vit-t14-reg4.py',  # the tiny student
]

crop_size = (48, 48)
img_scale = (128, 48)
embed_dim = _base_.kiv_student_t14.base.model_kwargs.embed_dim  # 64
num_classes = 2
metainfo = dict(classes=('wall', 'building'))
# SyncBN needs GPUs under DDP (single-process runs revert it to BN anyway)
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        # every architecture key of the tiny student replaces ViT-B/14's
        _base_.kiv_student_t14,
        base=dict(
            _base_.kiv_student_t14.base,
            model_kwargs=dict(_base_.kiv_student_t14.base.model_kwargs,
                              drop_path_rate=0.1)),
        drop_path_rate=0.1,
        # pyramid only, as the real config: no global tokens
        with_global_token=False,
        summary_names=None,
        norm_cfg=norm_cfg,
        init_cfg=dict(checkpoint='checkpoints/kiv_vit-t14_student.pth')),
    decode_head=dict(
        in_channels=[embed_dim] * 4, channels=32, num_classes=num_classes,
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=embed_dim, channels=16, num_classes=num_classes,
        norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=img_scale, ratio_range=(0.5, 2.0),
         keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(type='OptimWrapper')  # AMP needs a GPU
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
         end=1),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=1,
         end=2),
]
train_cfg = dict(max_iters=2, val_interval=1000)
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=2))
randomness = dict(seed=0)
