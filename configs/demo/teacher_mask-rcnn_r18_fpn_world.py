# Detection teacher of the demo: Mask R-CNN, ResNet-18 + FPN from scratch,
# trained briefly on the demo world (COCO layout). Its backbone + FPN are
# then a purpose-specific teacher (``part='backbone+neck'``).
_base_ = ['./_base_/world_mask-rcnn.py']
model = dict(
    backbone=dict(depth=18, frozen_stages=-1, norm_eval=False,
                  init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512]))
