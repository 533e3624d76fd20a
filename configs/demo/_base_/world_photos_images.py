# Unlabelled images of the demo: random crops of the real training photos
# (``world/photos/train``) plus the world's training scenes (labels
# ignored), 64x64. Held-out photo crops (``world/photos/heldout``) measure
# the inherited heads' agreement with their teachers. Paths are relative to
# the demo work dir.
train_pipeline = [
    dict(type='kiv.LoadImageFromFileSafe'),
    dict(type='mmpretrain.RandomResizedCrop', scale=64,
         crop_ratio_range=(0.4, 1.0), backend='cv2'),
    dict(type='mmcv.RandomFlip', prob=0.5),
    dict(type='kiv.PackImageInputs'),
]
train_dataloader = dict(
    batch_size=16,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(
        type='ConcatDataset',
        datasets=[
            dict(type='kiv.UnlabeledImageDataset',
                 data_root='world/photos/train/',
                 pipeline=train_pipeline),
            dict(type='kiv.UnlabeledImageDataset',
                 data_root='world/coco/',
                 ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img_path='train2017/'),
                 pipeline=train_pipeline),
        ]))
test_pipeline = [
    dict(type='kiv.LoadImageFromFileSafe'),
    dict(type='mmcv.Resize', scale=(64, 64), keep_ratio=False),
    dict(type='kiv.PackImageInputs'),
]
test_dataloader = dict(
    batch_size=16,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='kiv.UnlabeledImageDataset',
                 data_root='world/photos/heldout/',
                 pipeline=test_pipeline))
test_evaluator = dict(type='kiv.TeacherAgreementMetric')
test_cfg = dict(type='TestLoop')
