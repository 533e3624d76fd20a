# ImageNet-1k training images without labels (data/imagenet/train/**), for
# distillation. Any folder of images works: set data_root.
data_root = 'data/imagenet/train/'
train_pipeline = [
    dict(type='kiv.LoadImageFromFileSafe'),
    dict(type='mmpretrain.RandomResizedCrop', scale=224,
         crop_ratio_range=(0.35, 1.0), backend='pillow',
         interpolation='bicubic'),
    dict(type='mmcv.RandomFlip', prob=0.5),
    dict(type='kiv.PackImageInputs'),
]
train_dataloader = dict(
    batch_size=64,
    num_workers=8,
    persistent_workers=True,
    pin_memory=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(
        type='kiv.UnlabeledImageDataset',
        data_root=data_root,
        pipeline=train_pipeline))
val_pipeline = [
    dict(type='kiv.LoadImageFromFileSafe'),
    dict(type='mmcv.Resize', scale=(224, 224), keep_ratio=False),
    dict(type='kiv.PackImageInputs'),
]
val_dataloader = dict(
    batch_size=64,
    num_workers=8,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(
        type='kiv.UnlabeledImageDataset',
        data_root='data/imagenet/val/',
        pipeline=val_pipeline))
val_evaluator = dict(type='kiv.TeacherAgreementMetric')
test_dataloader = val_dataloader
test_evaluator = val_evaluator
