# Detection teacher of the demo, built the way real ones are: Mask R-CNN
# with an ImageNet-pretrained backbone (the real EfficientNet-Lite0 weights,
# ``kiv_demo.EfficientNetLite0``, stem and BatchNorm statistics frozen) + FPN,
# fine-tuned on the demo world (COCO layout). Its backbone + FPN are then a
# purpose-specific teacher (``part='backbone+neck'``).
_base_ = ['./_base_/world_mask-rcnn.py']
custom_imports = dict(imports=['kiv', 'kiv_demo'], allow_failed_imports=False)
model = dict(
    data_preprocessor=dict(mean=[127.5, 127.5, 127.5],
                           std=[127.5, 127.5, 127.5]),
    backbone=dict(_delete_=True, type='kiv_demo.EfficientNetLite0',
                  checkpoint='world/teachers/efficientnet_lite0.pth'),
    neck=dict(in_channels=[24, 40, 112, 320]))
# trained on the teachers' own labelled split (several times the user's
# labelled data, never given to the user or to any compared row)
train_dataloader = dict(dataset=dict(
    ann_file='annotations/instances_teachers2017.json',
    data_prefix=dict(img='teachers2017/')))
