# Detection / instance-segmentation probe of a frozen backbone: mmdet's
# Mask R-CNN (FPN + RPN + RoI heads) trained on the world (COCO layout) on
# the backbone's pyramid, computed once per backbone
# (``kiv_demo.AttachFeatures`` puts the cached maps of the image, flipped
# with it, where the image would be; ``kiv_demo.FeaturePassthrough`` hands
# them to the neck) and evaluated by mmdet's CocoMetric (box and mask AP).
# The demo sets the features file of each row and
# ``test_evaluator.outfile_prefix`` (results kept for the bootstrap
# intervals). The same model (minus backbone) is the detection
# head of the inherited student's and the rivals' multi-task training.
# Every channel of the cached maps is standardised with its statistics on
# the user's labelled scenes (``standardize=True``): rows' maps differ in
# scale by an order of magnitude, and the probe's fixed lr and budget must
# not favour one scale.
_base_ = ['./_base_/world_mask-rcnn.py']
custom_imports = dict(imports=['kiv', 'kiv_demo'], allow_failed_imports=False)
features = 'features/features.safetensors'
model = dict(
    data_preprocessor=dict(_delete_=True,
                           type='kiv_demo.FeatureDataPreprocessor'),
    backbone=dict(_delete_=True, type='kiv_demo.FeaturePassthrough'),
    neck=dict(in_channels=[128, 128, 128, 128]))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
    dict(type='kiv_demo.AttachFeatures', file=features, split='train',
         standardize=True),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor')),
    dict(type='kiv_demo.AttachFeatures', file=features, split='val',
         standardize=True),
]
train_dataloader = dict(batch_size=16, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=32, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
test_evaluator = dict(outfile_prefix='probe_det/results')
optim_wrapper = dict(optimizer=dict(lr=2e-3))
