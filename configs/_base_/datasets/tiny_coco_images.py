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
