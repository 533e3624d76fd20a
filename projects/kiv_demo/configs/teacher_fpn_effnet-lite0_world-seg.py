# Segmentation teacher of the demo, built the way real ones are: Semantic
# FPN with an ImageNet-pretrained backbone (the real EfficientNet-Lite0
# weights, ``kiv_demo.EfficientNetLite0``), fine-tuned on the demo world
# (ADE20K layout). Its whole model (per-pixel class logits at stride 4) is a
# purpose-specific teacher.
_base_ = ['./_base_/world_fpn-seg.py']
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
    data_prefix=dict(img_path='images/teachers',
                     seg_map_path='annotations/teachers')))
