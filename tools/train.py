#!/usr/bin/env python
"""Train with any OpenMMLab 2.x config: mmpretrain, mmdet, mmseg or kiv.

Examples::

    python tools/train.py configs/distill/<config>.py --work-dir work_dirs/x
    python tools/train.py <config> --resume              # latest in work_dir
    python tools/train.py <config> --resume work_dirs/x/iter_2.pth
    python tools/train.py <config> --nonfinite-loss stop  # stop at a NaN
    bash tools/dist_train.sh <config> 8                  # torchrun, 8 GPUs

Every run gets weights-only checkpoint loading and atomic writes
(``kiv.enable_safe_io()``), resumable checkpoints
(``kiv.SafeCheckpointHook``) and the non-finite loss guard
(``kiv.NonFiniteLossHook``: a NaN/Inf loss is skipped before it reaches the
weights, at most 5 in a row / 100 per run; set with the config key
``nonfinite_loss`` or ``--nonfinite-loss``). See docs/reliability.md.

kiv's configs hold the guard and the teacher cache themselves (the default
runtime's ``custom_hooks``; ``model.teacher_cache`` and
``kiv.TeacherCacheDataset`` in ``*_cached.py``), so mmpretrain's, mmdet's or
mmseg's own ``tools/train.py`` and ``Runner.from_cfg`` run them the same.
This tool adds the guard to configs without it (one at most) and writes
``--teacher-cache DIR`` / ``--cfg-options teacher_cache=DIR`` into every
place that reads the cache (docs/teacher_cache.md).
"""
import argparse
import os
import warnings

# mmengine 0.10 and mmcv import pkg_resources, which warns on every start.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import kiv  # noqa: E402  (registers kiv.*)
from kiv.apis.launch import (  # noqa: E402
    DictAction,
    add_nonfinite_loss_hook,
    add_safe_checkpoint_hook,
    die,
    finish_distributed,
    load_config,
    require_file,
    setup_cpu_distributed,
    setup_work_dir)
from kiv.engine.hooks import (  # noqa: E402
    NonFiniteLossError,
    NonFiniteWeightsError)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Train a model from an OpenMMLab config')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='directory for logs and models')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision (AmpOptimWrapper)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the real total batch size')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from CKPT, or without a value from the latest '
        'checkpoint in the work dir')
    parser.add_argument(
        '--nonfinite-loss', choices=['skip', 'stop', 'off'],
        help='on a NaN/Inf loss: skip the batch before the update (default, '
        'at most nonfinite_loss.max_consecutive in a row), stop the run, '
        'or off (no guard); overrides the config key nonfinite_loss')
    parser.add_argument(
        '--teacher-cache', metavar='DIR',
        help='train from this teacher-feature cache (written by '
        'tools/cache_teachers.py); overrides the config key teacher_cache')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (xxx=yyy format)')
    parser.add_argument('--launcher', default='none',
                        choices=['none', 'pytorch', 'slurm'],
                        help='job launcher')
    # torch.distributed.launch passes --local-rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main() -> None:
    args = parse_args()
    kiv.enable_safe_io()  # weights-only loading, atomic writes
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    setup_work_dir(cfg, args.config, args.work_dir)

    if args.amp:
        optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if optim_wrapper != 'AmpOptimWrapper':
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in \
                cfg.auto_scale_lr:
            raise SystemExit('error: --auto-scale-lr needs '
                             'auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = require_file(args.resume, 'resume checkpoint')
    elif cfg.get('load_from'):
        require_file(cfg.load_from, 'load_from checkpoint')

    # --teacher-cache DIR and --cfg-options teacher_cache=DIR replace the
    # config's cache everywhere it is read (model.teacher_cache, the
    # kiv.TeacherCacheDataset); a config that names one is checked whole
    from kiv.datasets.teacher_cache import TeacherCacheError
    from kiv.datasets.teacher_cache.config import (teacher_cache_dir,
                                                   use_teacher_cache)
    try:
        cache = args.teacher_cache or \
            (args.cfg_options or {}).get('teacher_cache') or \
            teacher_cache_dir(cfg)
        if cache:
            use_teacher_cache(cfg, cache)
    except TeacherCacheError as err:
        die(str(err))

    add_safe_checkpoint_hook(cfg)
    add_nonfinite_loss_hook(cfg, args.nonfinite_loss)
    setup_cpu_distributed(cfg, args.launcher)

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    try:
        runner.train()
    except (NonFiniteLossError, NonFiniteWeightsError) as err:
        runner.logger.error(str(err))  # console and the run's log file
        raise SystemExit(3) from None
    finish_distributed()


if __name__ == '__main__':
    main()
