# Unlabelled images of the tiny COCO layout (labels ignored), 56x56 crops.
# ``kiv.testing.make_tiny_coco('data/coco')`` writes the data.
data_root = 'data/coco/'
train_pipeline = [
    dict(type='kiv.LoadImageFromFileSafe'),
    dict(type='mmcv.Resize', scale=(56, 56), keep_ratio=False),
    dict(type='mmcv.RandomFlip', prob=0.5),
    dict(type='kiv.PackImageInputs'),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(
        type='kiv.UnlabeledImageDataset',
        data_root=data_root,
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img_path='train2017/'),
        pipeline=train_pipeline))
val_pipeline = [
    dict(type='kiv.LoadImageFromFileSafe'),
    dict(type='mmcv.Resize', scale=(56, 56), keep_ratio=False),
    dict(type='kiv.PackImageInputs'),
]
val_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(
        type='kiv.UnlabeledImageDataset',
        data_root=data_root,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img_path='val2017/'),
        pipeline=val_pipeline))
val_evaluator = dict(type='kiv.TeacherAgreementMetric')
test_dataloader = val_dataloader
test_evaluator = val_evaluator
