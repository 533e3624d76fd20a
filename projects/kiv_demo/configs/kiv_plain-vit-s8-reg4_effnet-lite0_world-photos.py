# Making the demo's general-purpose knowledge base (a stand-in for DINOv2,
# which cannot be downloaded here): a small DINOv2-like timm ViT (patch 8,
# 4 registers, LayerScale), every weight trainable
# (``kiv_demo.PlainViTStudent``), distilled from the real pretrained
# EfficientNet-Lite0 (its pooled 1280-d summary and four dense levels; MSE
# on PHI-S-standardised targets, the default losses) on views of real photo
# crops and world scenes. The demo trains it from the teacher-feature cache
# (``teacher_cache/``: EfficientNet is never run during training) with
# statistics fixed before step 0. The ViT weights are then saved as a timm
# checkpoint (``knowledge_base/kb_vit.pth``) and frozen as the knowledge
# base.
_base_ = [
    '../../../configs/_base_/default_runtime.py',
    './_base_/world_photos_images.py',
    './_base_/effnet_lite0_teacher.py',
    './_base_/kb-vit-s8-reg4_adapter.py',
]
custom_imports = dict(imports=['kiv', 'kiv_demo'], allow_failed_imports=False)
model = dict(
    type='kiv.KnowledgeInheritance',
    student=dict(type='kiv_demo.PlainViTStudent',
                 base=dict(_base_.kb_vit, checkpoint=None)),
    teachers=dict(effnet={{_base_.effnet_teacher}}),
    latent=dict(type='kiv.SharedLatentSpace', standardize='phis',
                hidden_dim=256,
                teachers=dict(effnet=dict(student_levels=[1, 2, 3]))),
    grad_share_interval=0)
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05, fused=True),
    constructor='kiv.GroupedOptimWrapperConstructor',
    clip_grad=dict(max_norm=1.0),
    # no decay on norms, biases, other 1-d parameters, the LayerScale
    # gammas, the position embedding and the CLS / register tokens (the
    # rule of the downstream configs)
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={'.gamma': dict(decay_mult=0.0),
                     '.pos_embed': dict(decay_mult=0.0),
                     '.cls_token': dict(decay_mult=0.0),
                     '.reg_token': dict(decay_mult=0.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=30),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=False, begin=30,
         end=1000),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=1000)
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=1000, by_epoch=False, max_keep_ckpts=1))
# statistics from one full pass over the (cached) views, fixed before step 0
custom_hooks = [dict(type='kiv.SafeCheckpointHook'),
                dict(type='kiv.NonFiniteLossHook'),
                dict(type='kiv.StatisticsWarmupHook', num_batches=10**6)]
log_processor = dict(window_size=10)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
