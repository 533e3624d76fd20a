# Runtime shared by kiv's distillation configs (MMEngine Runner).
default_scope = 'kiv'
custom_imports = dict(imports=['kiv'], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=5000, by_epoch=False,
                    max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
custom_hooks = [
    dict(type='kiv.SafeCheckpointHook'),
    # a NaN/Inf loss is skipped before it reaches the weights (at most 5 in
    # a row, 100 per run), under any entry point; configure with the key
    # nonfinite_loss = dict(action='stop', ...) or 'off' (docs/reliability.md)
    dict(type='kiv.NonFiniteLossHook'),
    dict(type='kiv.BadImageReportHook', interval=1000),
    # fix the latent space's statistics from a teacher-only pass (at most one
    # epoch) before the first step; skipped on resume and with a cache
    dict(type='kiv.StatisticsWarmupHook', num_batches=50),
    # after the last step: the inherited outputs' per-channel statistics for
    # the label-free calibration of the inherited heads (calibrate=True)
    dict(type='kiv.InheritedCalibrationHook', num_batches=50),
]
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='Visualizer', vis_backends=vis_backends)
log_processor = dict(by_epoch=False, window_size=50)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
