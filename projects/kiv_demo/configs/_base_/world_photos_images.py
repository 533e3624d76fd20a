# Unlabelled images of the demo's distillation: random crops of the real
# training photos (``world/photos/train``) and the world's training scenes,
# listed together in ``world/distill.txt`` (paths relative to ``world/``).
# Views are 64x64 random resized crops, flipped half of the time; the
# teacher-feature cache replays exactly these views (``kiv.ReplayView``).
# Held-out photo crops (``world/photos/heldout``) are the test set of the
# inherited heads' agreement with their teachers (generalisation). Paths are
# relative to the demo work dir.
train_pipeline = [
    dict(type='kiv.LoadImageFromFileSafe'),
    dict(type='mmpretrain.RandomResizedCrop', scale=64,
         crop_ratio_range=(0.4, 1.0), backend='cv2'),
    dict(type='mmcv.RandomFlip', prob=0.5),
    dict(type='kiv.PackImageInputs'),
]
train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='kiv.UnlabeledImageDataset',
                 data_root='world/',
                 ann_file='distill.txt',
                 pipeline=train_pipeline))
test_pipeline = [
    dict(type='kiv.LoadImageFromFileSafe'),
    dict(type='mmcv.Resize', scale=(64, 64), keep_ratio=False),
    dict(type='kiv.PackImageInputs'),
]
test_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='kiv.UnlabeledImageDataset',
                 data_root='world/photos/heldout/',
                 pipeline=test_pipeline))
test_evaluator = dict(type='kiv.TeacherAgreementMetric')
test_cfg = dict(type='TestLoop')
