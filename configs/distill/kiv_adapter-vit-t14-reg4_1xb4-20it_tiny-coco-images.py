# Tiny CPU version of the knowledge-inheritance recipe (same structure as the
# real-scale config, small sizes): MSE on PHI-S targets, statistics fixed by
# the base runtime's StatisticsWarmupHook (here one epoch = 2 batches). Teachers are random tiny models written by
# ``python tools/misc/create_tiny_teachers.py`` (data/tiny_teachers) and
# loaded through the real loading paths; images come from the tiny COCO
# layout (``kiv.testing.make_tiny_coco('data/coco')``), labels ignored.
_base_ = [
    '../_base_/default_runtime.py',
    '../_base_/datasets/tiny_coco_images.py',
    '../_base_/models/kiv_adapter-vit-t14-reg4.py',  # the student
    '../_base_/models/kiv_detector-space.py',  # detector levels
]
teacher_dir = 'data/tiny_teachers/'
imagenet_norm = dict(mean=[123.675, 116.28, 103.53],
                     std=[58.395, 57.12, 57.375])
clip_norm = dict(mean=[122.771, 116.746, 104.094],
                 std=[68.501, 66.632, 70.323])
# the knowledge base = the student's base ViT: a DINOv2-like ViT (patch 14,
# 4 registers)
dinov2 = dict(
    _base_.kiv_student_t14.base,
    checkpoint=teacher_dir + 'dinov2_tiny.pth')

model = dict(
    type='kiv.KnowledgeInheritance',
    base_teacher='dinov2',
    # the architecture of configs/_base_/models/kiv_adapter-vit-t14-reg4.py
    # (a summary per teacher with one: dinov2, clip) on the knowledge base
    student=dict(_base_.kiv_student_t14, base=dinov2),
    **{f'student_{k}': v for k, v in imagenet_norm.items()},
    teachers=dict(
        dinov2=dict(
            type='kiv.Teacher',
            source=dinov2,
            input_size=56, pad_to_multiple=14,
            forward_method='forward_features',
            summary=dict(type='cls'),
            **imagenet_norm),
        clip=dict(
            type='kiv.Teacher',
            source=dict(
                type='timm',
                model_name='vit_base_patch16_clip_224',
                checkpoint=teacher_dir + 'clip_tiny.pth',
                model_kwargs=dict(img_size=64, embed_dim=48, depth=2,
                                  num_heads=2, num_classes=0)),
            input_size=64, pad_to_multiple=16,
            forward_method='forward_features',
            summary=dict(type='cls'),
            **clip_norm),
        detector=dict(
            type='kiv.Teacher',
            source=dict(
                type='mm',
                config=teacher_dir + 'retinanet_tiny.py',
                checkpoint=teacher_dir + 'retinanet_tiny.pth',
                part='backbone+neck'),
            input_size=64,
            summary=dict(type='none'),  # dense only, like the real recipe
            **imagenet_norm),
    ),
    latent=dict(
        type='kiv.SharedLatentSpace',
        standardize='phis',
        hidden_dim=64,
        teachers=dict(detector=dict(
            student_levels=_base_.kiv_detector_space_t14['student_levels']))),
    grad_share_interval=5,
)

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05, fused=True),
    constructor='kiv.GroupedOptimWrapperConstructor',
    clip_grad=dict(max_norm=1.0),
    # the real recipe's rule and groups (configs/_base_/schedules/
    # adamw_100k.py): no decay on norms, biases, 1-d parameters, gates,
    # level embedding, latent queries and the base teacher's preserved skip
    # paths, one parameter group per set of options
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={'.gamma': dict(decay_mult=0.0),
                     'pyramid_gammas': dict(decay_mult=0.0),
                     'level_embed': dict(decay_mult=0.0),
                     'pool.latent': dict(decay_mult=0.0),
                     '.skip.': dict(decay_mult=0.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=5),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=20, val_interval=20)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    logger=dict(interval=5),
    checkpoint=dict(interval=20))
log_processor = dict(window_size=5)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
