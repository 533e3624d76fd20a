# Semantic-segmentation probe of a frozen backbone: mmseg's Semantic FPN
# (FPN neck + FPNHead) trained on the world (ADE20K layout, background
# ignored as ADE20K's ``reduce_zero_label``) on the backbone's pyramid,
# computed once per backbone (``kiv_demo.AttachFeatures``,
# ``kiv_demo.FeaturePassthrough``) and evaluated by mmseg's IoUMetric (mIoU;
# ``kiv_demo.IoUMetricWithSamples`` also keeps the per-image areas for the
# bootstrap intervals). The same model (minus backbone) is the segmentation
# head of the inherited student's and the rivals' multi-task training.
# Every channel of the cached maps is standardised with its statistics on
# the user's labelled scenes (``standardize=True``): rows' maps differ in
# scale by an order of magnitude, and the probe's fixed lr and budget must
# not favour one scale.
_base_ = ['./_base_/world_fpn-seg.py']
custom_imports = dict(imports=['kiv', 'kiv_demo'], allow_failed_imports=False)
features = 'features/features.safetensors'
model = dict(
    data_preprocessor=dict(_delete_=True,
                           type='kiv_demo.FeatureDataPreprocessor'),
    backbone=dict(_delete_=True, type='kiv_demo.FeaturePassthrough'),
    neck=dict(in_channels=[128, 128, 128, 128]))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
    dict(type='kiv_demo.AttachFeatures', file=features, split='train',
         standardize=True),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
    dict(type='kiv_demo.AttachFeatures', file=features, split='val',
         standardize=True),
]
train_dataloader = dict(batch_size=16, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=32, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
test_evaluator = dict(type='kiv_demo.IoUMetricWithSamples',
                      samples_file='probe_seg/samples.npz',
                      iou_metrics=['mIoU'])
optim_wrapper = dict(optimizer=dict(lr=2e-3))
