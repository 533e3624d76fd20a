#!/usr/bin/env python
"""Run every teacher of a distillation config once and cache its outputs.

Examples::

    # disk use first (per view and total), nothing written
    python tools/cache_teachers.py CONFIG --views 4 --dry-run
    # write (or resume) the cache; 8 GPUs through torchrun
    python tools/cache_teachers.py CONFIG --views 4 --out work_dirs/cache
    python -m torch.distributed.run --nproc_per_node 8 \\
        tools/cache_teachers.py CONFIG --views 4 --launcher pytorch
    # then train from it: teacher_cache='work_dirs/cache' in the config

The output directory defaults to the config's ``teacher_cache`` (the switch
that makes ``tools/train.py`` train from the cache), else
``work_dirs/teacher_cache/<config name>``. A killed run resumes where it
stopped when given the same command. See docs/teacher_cache.md.
"""
import argparse
import datetime
import os
import os.path as osp
import sys
import warnings

# mmengine 0.10 and mmcv import pkg_resources, which warns on every start.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import torch  # noqa: E402

import kiv  # noqa: E402  (registers kiv.*)
from kiv.apis.launch import DictAction, die, load_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Cache the teachers of a distillation config')
    parser.add_argument('config', help='distillation config file')
    parser.add_argument('--out', help='cache directory (default: the '
                        "config's teacher_cache, else "
                        'work_dirs/teacher_cache/<config name>)')
    parser.add_argument('--views', type=int, default=1,
                        help='augmented views per image K (default 1)')
    parser.add_argument('--dtype', default='fp16',
                        choices=['fp16', 'bf16', 'fp32'],
                        help='storage dtype of the targets (default fp16)')
    parser.add_argument('--shard-size', type=int,
                        help='images per shard (default: the existing '
                        "cache's, else about 1 GiB per shard)")
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the views (default 0)')
    parser.add_argument('--batch-size', type=int,
                        help='views per teacher forward (default: '
                        'train_dataloader.batch_size)')
    parser.add_argument('--workers', type=int,
                        help='image-loading workers (default: '
                        'train_dataloader.num_workers)')
    parser.add_argument('--dry-run', action='store_true',
                        help='print the disk use and exit')
    parser.add_argument('--reuse', nargs='+', default=[], metavar='DIR',
                        help='caches of the same images and views to copy '
                        'teachers\' outputs from instead of running them '
                        '(every teacher of the config found there; checked '
                        'on the first views)')
    parser.add_argument('--no-space-check', action='store_true',
                        help='write even if the disk looks too small')
    parser.add_argument('--launcher', default='none',
                        choices=['none', 'pytorch', 'slurm'],
                        help='job launcher (split the shards over ranks)')
    parser.add_argument('--dist-timeout', type=float, default=48.0,
                        help='hours a rank may wait for the others at the '
                        'end (default 48)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (xxx=yyy format)')
    # torch.distributed.launch passes --local-rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def init_distributed(launcher: str, timeout_hours: float) -> None:
    """Start the process group of ``launcher`` through mmengine.

    On GPU machines this is :func:`mmengine.dist.init_dist` (NCCL). Without
    a GPU, mmengine's launcher would call ``torch.cuda.set_device``; as in
    ``tools/train.py`` (``kiv.apis.launch.setup_cpu_distributed``) the
    gloo group is started from torchrun's environment instead.

    Args:
        launcher (str): ``'pytorch'`` or ``'slurm'``.
        timeout_hours (float): collective timeout (ranks wait for each other
            at the end of their shares).
    """
    import torch.distributed as dist
    from mmengine.dist import init_dist
    timeout = datetime.timedelta(hours=timeout_hours)
    if torch.cuda.is_available():
        init_dist(launcher, backend='nccl', timeout=timeout)
        return
    if launcher == 'slurm':
        die('--launcher slurm needs GPUs; use --launcher pytorch (torchrun) '
            'for CPU runs')
    dist.init_process_group(backend='gloo', timeout=timeout,
                            rank=int(os.environ['RANK']),
                            world_size=int(os.environ['WORLD_SIZE']))


def main() -> None:
    args = parse_args()
    kiv.enable_safe_io()  # weights-only checkpoint loading
    cfg = load_config(args.config, args.cfg_options)
    out = args.out or cfg.get('teacher_cache', None) or osp.join(
        'work_dirs', 'teacher_cache',
        osp.splitext(osp.basename(args.config))[0])
    if args.views < 1:
        die(f'--views must be >= 1, got {args.views}')
    if args.shard_size is not None and args.shard_size < 1:
        die(f'--shard-size must be >= 1, got {args.shard_size}')
    if args.launcher != 'none' and not args.dry_run:
        init_distributed(args.launcher, args.dist_timeout)

    from kiv.datasets.teacher_cache import (TeacherCacheError,
                                            TeacherCacheWriter)
    try:
        writer = TeacherCacheWriter(
            cfg, out, views=args.views, dtype=args.dtype,
            shard_size=args.shard_size, seed=args.seed,
            batch_size=args.batch_size, num_workers=args.workers,
            config_path=args.config, reuse=args.reuse)
        writer.prepare()
        if args.dry_run:
            print(writer.report())
            return
        writer.run(check_space=not args.no_space_check)
    except TeacherCacheError as err:
        die(str(err))


if __name__ == '__main__':
    sys.exit(main())
