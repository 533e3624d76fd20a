# Knowledge inheritance in the demo: the student is the frozen knowledge
# base (``knowledge_base/kb_vit.pth``) plus a zero-initialised ViT-Adapter;
# teachers: the knowledge base itself, the real EfficientNet-Lite0 (its
# classifier kept as inherited head), and the detection and segmentation
# teachers the demo trained (``teacher_det/``, ``teacher_seg/``). Same
# structure as configs/distill/*8xb64*.py, at 64 px on 2 CPU cores.
_base_ = [
    '../_base_/default_runtime.py',
    './_base_/world_photos_images.py',
    './_base_/effnet_lite0_teacher.py',
]
custom_imports = dict(imports=['kiv', 'kiv.demo'], allow_failed_imports=False)
imagenet_norm = dict(mean=[123.675, 116.28, 103.53],
                     std=[58.395, 57.12, 57.375])
kb_vit = dict(
    model_name='vit_small_patch14_reg4_dinov2',
    checkpoint='knowledge_base/kb_vit.pth',
    model_kwargs=dict(img_size=64, patch_size=8, embed_dim=128, depth=6,
                      num_heads=4, init_values=0.1))
model = dict(
    type='kiv.KnowledgeInheritance',
    base_teacher='kb',
    student=dict(
        type='kiv.AdapterViT',
        base=dict(type='timm', **kb_vit),
        interaction_indexes=[[0, 0], [1, 2], [3, 4], [5, 5]],
        conv_inplane=32,
        deform_num_heads=4,
        n_points=4,
        with_global_token=True),
    **{f'student_{k}': v for k, v in imagenet_norm.items()},
    teachers=dict(
        kb=dict(type='kiv.Teacher',
                source=dict(type='timm', **kb_vit),
                input_size=64, pad_to_multiple=8,
                forward_method='forward_features',
                summary=dict(type='cls'),
                **imagenet_norm),
        effnet={{_base_.effnet_teacher}},
        det=dict(type='kiv.Teacher',
                 source=dict(type='mm',
                             config='teacher_det/teacher_det.py',
                             checkpoint='teacher_det/teacher_det.pth',
                             part='backbone+neck'),
                 input_size=64,
                 features=dict(from_output=True, indices=[0, 1, 2, 3]),
                 summary=dict(type='avg'),
                 **imagenet_norm),
        seg=dict(type='kiv.Teacher',
                 source=dict(type='mm',
                             config='teacher_seg/teacher_seg.py',
                             checkpoint='teacher_seg/teacher_seg.pth',
                             part='whole'),
                 input_size=64,
                 summary=dict(type='avg'),
                 **imagenet_norm)),
    latent=dict(
        type='kiv.SharedLatentSpace',
        standardize='phis',
        hidden_dim=256,
        teachers=dict(kb=dict(student_levels=[1]),
                      effnet=dict(student_levels=[0, 1, 2, 3]),
                      det=dict(student_levels=[0, 1, 2, 3]),
                      seg=dict(student_levels=[0]))),
    grad_share_interval=20)
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=1.0),
    paramwise_cfg=dict(custom_keys={'.gamma': dict(decay_mult=0.0),
                                    '.level_embed': dict(decay_mult=0.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=30),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=False, begin=30,
         end=300),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=300)
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=300, by_epoch=False, max_keep_ckpts=1))
custom_hooks = [dict(type='kiv.SafeCheckpointHook'),
                dict(type='kiv.StatisticsWarmupHook', num_batches=20)]
log_processor = dict(window_size=10)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
