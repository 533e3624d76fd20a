# Segmentation teacher of the demo: Semantic FPN, ResNet-18-V1c from
# scratch, trained briefly on the demo world (ADE20K layout). Its whole
# model (per-pixel class logits at stride 4) is a purpose-specific teacher.
_base_ = ['./_base_/world_fpn-seg.py']
model = dict(
    backbone=dict(depth=18, norm_cfg=dict(type='BN', requires_grad=True)),
    neck=dict(in_channels=[64, 128, 256, 512]))
