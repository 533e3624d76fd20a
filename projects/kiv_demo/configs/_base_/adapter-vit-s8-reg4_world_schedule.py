# What the demo's inherited student and its data-centric rivals share, by
# construction (their architecture, the knowledge-base ViT layout + the
# same ViT-Adapter, is ``kb-vit-s8-reg4_adapter.py``): the labelled 64 px
# views (random resized crop + flip, the world's labels following each
# view), the multi-task heads (``task_models``: a linear classifier on the
# summary, and the model of the demo's Mask R-CNN and Semantic FPN probe
# configs on the pyramid; the demo builds them with ``kiv_demo.TaskHead``) and
# the optimisation (AdamW, warm-up + cosine, clipping, the same
# parameter-wise rule). The demo sets the iterations, batch size and
# learning rate of each side (``kiv_demo.presets``).
_base_ = ['../../../../configs/_base_/default_runtime.py']
custom_imports = dict(imports=['kiv', 'kiv_demo'], allow_failed_imports=False)
task_models = dict(
    cls=dict(type='mmpretrain.ImageClassifier', neck=None,
             head=dict(type='LinearClsHead', num_classes=6, in_channels=128,
                       loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
                       topk=(1, ))),
    det='probe_mask-rcnn_world.py',
    seg='probe_fpn_world-seg.py')
labelled_view_pipeline = [
    dict(type='kiv.LoadImageFromFileSafe'),
    dict(type='kiv.ReplayView', scale=64, crop_ratio_range=(0.4, 1.0),
         flip_prob=0.5),
    dict(type='kiv_demo.WorldViewLabels'),
    dict(type='kiv_demo.PackWorldInputs'),
]
optim_wrapper = dict(
    type='OptimWrapper',
    # fused AdamW in the few parameter groups the rules below need (one
    # per set of options, not one per parameter): 15 ms per step instead of
    # 45-85 ms for the ~400 tensors of a student (AMD EPYC, one thread)
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05, fused=True),
    constructor='kiv.GroupedOptimWrapperConstructor',
    clip_grad=dict(max_norm=1.0),
    paramwise_cfg=dict(
        # no decay on norms, biases and other 1-d parameters
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={
            # the adapter's zero-initialised gates must open within a few
            # hundred steps: 10x lr, no decay (the longest key matches
            # first)
            'injector.gamma': dict(lr_mult=10.0, decay_mult=0.0),
            'global_token.gamma': dict(lr_mult=10.0, decay_mult=0.0),
            # the inherited student's per-teacher summaries (their gates)
            'summary_tokens.kb.gamma': dict(lr_mult=10.0, decay_mult=0.0),
            'summary_tokens.effnet.gamma': dict(lr_mult=10.0,
                                                decay_mult=0.0),
            'pyramid_gammas': dict(lr_mult=10.0, decay_mult=0.0),
            '.gamma': dict(decay_mult=0.0),  # the ViT's LayerScale
            # the rivals' trainable ViT (frozen in the inherited student)
            '.pos_embed': dict(decay_mult=0.0),
            '.cls_token': dict(decay_mult=0.0),
            '.reg_token': dict(decay_mult=0.0),
            '.level_embed': dict(decay_mult=0.0),
            'pool.latent': dict(decay_mult=0.0),  # latent queries
            # the knowledge base's preserved s2t heads (skip path = its
            # standardiser at step 0)
            '.skip.': dict(decay_mult=0.0)}))
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
                dict(type='kiv.NonFiniteLossHook')]
log_processor = dict(window_size=10)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
