# AdamW, bf16 AMP, 100k iterations with linear warm-up and cosine decay.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    dtype='bfloat16',
    # fused AdamW: every tensor of a parameter group in one kernel
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999),
                   weight_decay=0.05, fused=True),
    # mmengine's parameter-wise rules below, in one parameter group per set
    # of options (a handful) instead of one per parameter
    constructor='kiv.GroupedOptimWrapperConstructor',
    clip_grad=dict(max_norm=3.0),
    # No weight decay (keys match substrings of the full parameter name):
    # norms, biases and every other 1-d parameter; the zero-initialised
    # gates (injector / global-token / summary-token ``gamma`` s, the
    # pyramid gates ``pyramid_gammas.N``; also any trainable LayerScale
    # ``ls1/ls2.gamma``); the level embedding; the latent queries of the
    # attention pools; and the preserved skip path of the base teacher's
    # s2t heads (``latent.*_heads.<base>[.<i>].skip``, which start as its
    # standardiser: decay would pull them off the knowledge base).
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
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0,
         end=2000),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=False,
         begin=2000, end=100000),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=100000,
                 val_interval=10000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
# lr above is for 8 GPUs x 64 images; `--auto-scale-lr` rescales it.
auto_scale_lr = dict(base_batch_size=512, enable=False)
