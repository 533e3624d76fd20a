"""Tiny random-initialised teachers saved as real checkpoint files.

They stand in for DINOv2 / CLIP / a detector in the tiny CPU configs and the
tests, and are loaded back through the real teacher loading paths (timm
names + ``checkpoint_filter_fn``, mmdet config + full-detector checkpoint).
"""
from __future__ import annotations

import os
import os.path as osp

import torch

from kiv.utils.atomic import atomic_torch_save

#: tiny DINOv2-like ViT: patch 14, 4 registers, LayerScale (timm name + args)
DINOV2_TINY = dict(
    model_name='vit_small_patch14_reg4_dinov2',
    model_kwargs=dict(img_size=56, embed_dim=64, depth=4, num_heads=2))
#: tiny CLIP-like ViT: patch 16, pre-norm, no registers
CLIP_TINY = dict(
    model_name='vit_base_patch16_clip_224',
    model_kwargs=dict(img_size=64, embed_dim=48, depth=2, num_heads=2))
#: tiny detector: RetinaNet, ResNet-18 + 32-channel FPN (mmdet model dict)
DETECTOR_TINY = dict(
    type='RetinaNet',
    data_preprocessor=dict(type='DetDataPreprocessor',
                           mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True,
                           pad_size_divisor=32),
    backbone=dict(type='ResNet', depth=18, num_stages=4,
                  out_indices=(0, 1, 2, 3), frozen_stages=-1,
                  norm_cfg=dict(type='BN', requires_grad=True),
                  norm_eval=True, style='pytorch'),
    neck=dict(type='FPN', in_channels=[64, 128, 256, 512], out_channels=32,
              start_level=1, add_extra_convs='on_input', num_outs=3),
    bbox_head=dict(
        type='RetinaHead', num_classes=2, in_channels=32, stacked_convs=1,
        feat_channels=32,
        anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4,
                              scales_per_octave=1, ratios=[1.0],
                              strides=[8, 16, 32]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder',
                        target_means=[.0, .0, .0, .0],
                        target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0,
                      alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5,
                      neg_iou_thr=0.4, min_pos_iou=0, ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'), allowed_border=-1,
        pos_weight=-1, debug=False),
    test_cfg=dict(nms_pre=100, min_bbox_size=0, score_thr=0.05,
                  nms=dict(type='nms', iou_threshold=0.5), max_per_img=10))


def _save(obj: dict, path: str) -> None:
    atomic_torch_save(obj, path)


def create_tiny_teachers(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write ``dinov2_tiny.pth``, ``clip_tiny.pth``, ``retinanet_tiny.pth``
    and the detector's mmdet config ``retinanet_tiny.py``.

    Args:
        out_dir (str): output directory (created).
        seed (int): torch seed for the random initialisation.

    Returns:
        dict[str, str]: teacher name -> checkpoint path.
    """
    import timm
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.registry import DefaultScope
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    paths = {}
    for name, spec in (('dinov2_tiny', DINOV2_TINY),
                       ('clip_tiny', CLIP_TINY)):
        model = timm.create_model(spec['model_name'], pretrained=False,
                                  num_classes=0, **spec['model_kwargs'])
        paths[name] = osp.join(out_dir, f'{name}.pth')
        _save(model.state_dict(), paths[name])
    import mmdet.models  # noqa: F401  registers mmdet modules
    with DefaultScope.overwrite_default_scope('mmdet'):
        det = DET_MODELS.build(DETECTOR_TINY)
    from mmengine.config import Config
    cfg_path = osp.join(out_dir, 'retinanet_tiny.py')
    Config(dict(default_scope='mmdet', model=DETECTOR_TINY)).dump(cfg_path)
    paths['retinanet_tiny_config'] = cfg_path
    paths['retinanet_tiny'] = osp.join(out_dir, 'retinanet_tiny.pth')
    _save({'state_dict': det.state_dict(), 'meta': {'note': 'tiny random'}},
          paths['retinanet_tiny'])
    return paths
