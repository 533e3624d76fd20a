# Tiny CPU version of
# kiv-adapter-vit-b14_linear-probe_8xb128-coslr-100e_in1k.py
# (inherited: same frozen backbone, linear head, SGD + cosine, accuracy),
# with the tiny student of
# configs/distill/kiv_adapter-vit-t14-reg4_1xb4-20it_tiny-coco-images.py
# (width 64, 4 blocks) on the tiny ImageNet layout written by
# kiv.testing.make_tiny_imagenet('data/imagenet') (2 classes, 4 training
# images: 2 epochs = 2 iterations). 56 = 4 x 14 px crops.
#   python tools/train.py configs/mmpretrain/<this file> \
#       --cfg-options model.backbone.init_cfg.checkpoint=<student.pth>
_base_ = [
    './kiv-adapter-vit-b14_linear-probe_8xb128-coslr-100e_in1k.py',
    '../_base_/models/kiv_adapter-vit-t14-reg4.py',  # the tiny student
]

embed_dim = _base_.kiv_student_t14.base.model_kwargs.embed_dim  # 64
num_classes = 2
crop_size = 56
metainfo = dict(classes=('n00000000', 'n00000001'))

data_preprocessor = dict(num_classes=num_classes)
model = dict(
    backbone=dict(
        # every architecture key of the tiny student replaces ViT-B/14's
        _base_.kiv_student_t14,
        norm_cfg=dict(type='BN'),  # SyncBN needs GPUs under DDP
        init_cfg=dict(checkpoint='checkpoints/kiv_vit-t14_student.pth')),
    head=dict(num_classes=num_classes, in_channels=embed_dim,
              topk=(1, num_classes)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=crop_size, backend='pillow'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=64, edge='short', backend='pillow'),
    dict(type='CenterCrop', crop_size=crop_size),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=4, num_workers=0,
    dataset=dict(metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0,
    dataset=dict(metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, num_classes))
test_evaluator = val_evaluator

optim_wrapper = dict(type='OptimWrapper')  # AMP needs a GPU
param_scheduler = [
    dict(type='CosineAnnealingLR', T_max=2, by_epoch=True, begin=0, end=2)
]
train_cfg = dict(max_epochs=2, val_interval=2)
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=2))
