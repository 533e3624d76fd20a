#!/usr/bin/env python
"""Test (evaluate) a checkpoint with any OpenMMLab 2.x config.

Prints the metrics, then one summary table (task, dataset, metric, value,
checkpoint). Examples::

    python tools/test.py <mmdet config> <ckpt> --out preds.pkl
    python tools/test.py <mmseg config> <ckpt> --show-dir vis/
    python tools/test.py <mmpretrain config> <ckpt> --data-root /data/imagenet
    bash tools/dist_test.sh <config> <ckpt> 8

The checkpoint (and any ``init_cfg`` / URL weights) is loaded with
``torch.load(weights_only=True)`` (``kiv.enable_safe_io()``).
"""
import argparse
import os
import warnings

# mmengine 0.10 and mmcv import pkg_resources, which warns on every start.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import kiv  # noqa: E402  (registers kiv.*)
from kiv.apis.data_root import check_dataset, set_data_root  # noqa: E402
from kiv.apis.launch import (  # noqa: E402
    DictAction,
    config_scope,
    die,
    finish_distributed,
    load_config,
    require_file,
    setup_cpu_distributed,
    setup_work_dir)
from kiv.apis.summary import format_summary_table  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Test a checkpoint with an OpenMMLab config')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='directory for the test logs')
    parser.add_argument('--out', help='dump raw predictions to this pickle')
    parser.add_argument('--show-dir',
                        help='save visualised predictions in this directory '
                        '(relative to the run\'s log dir for mmdet/mmseg)')
    parser.add_argument(
        '--data-root',
        help='test data in DIR instead of the config\'s data_root (the '
        'standard layout: COCO: annotations/ + val2017/; ADE20K: '
        'ADEChallengeData2016/; ImageNet: val/ + meta/); also moves '
        'evaluator files under the old root (COCO ann_file)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (xxx=yyy format)')
    parser.add_argument('--launcher', default='none',
                        choices=['none', 'pytorch', 'slurm'],
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


#: each toolbox's visualisation hook, used when a config has none
VIS_HOOKS = {
    'mmpretrain': 'VisualizationHook',
    'mmdet': 'DetVisualizationHook',
    'mmseg': 'SegVisualizationHook',
}


def enable_visualization(cfg, scope: str, show_dir: str) -> None:
    """Turn on the toolbox's visualisation hook and direct it to show_dir.
    """
    hooks = cfg.setdefault('default_hooks', {})
    if 'visualization' not in hooks:
        if scope not in VIS_HOOKS:
            die(f'--show-dir: config scope {scope!r} has no visualization '
                'hook; add default_hooks.visualization to the config')
        hooks['visualization'] = dict(type=VIS_HOOKS[scope])
    hook = hooks['visualization']
    hook['interval'] = 1  # every test image, like the toolboxes' own tools
    if scope == 'mmpretrain':
        hook['enable'] = True
        hook['out_dir'] = show_dir
    elif scope == 'mmdet':
        hook['draw'] = True
        hook['test_out_dir'] = show_dir
    else:  # mmseg and others: the visualizer's save_dir
        hook['draw'] = True
        cfg.visualizer['save_dir'] = show_dir


def main() -> None:
    args = parse_args()
    kiv.enable_safe_io()  # weights-only checkpoint loading, atomic writes
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    setup_work_dir(cfg, args.config, args.work_dir)
    cfg.load_from = require_file(args.checkpoint, 'checkpoint')
    if args.data_root:
        set_data_root(cfg, args.data_root)
    check_dataset(cfg)
    scope = config_scope(cfg)
    if args.show_dir:
        enable_visualization(cfg, scope, args.show_dir)
    if args.out and not args.out.endswith(('.pkl', '.pickle')):
        die(f'--out must end with .pkl or .pickle: {args.out}')
    setup_cpu_distributed(cfg, args.launcher)

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg \
        else RUNNERS.build(cfg)
    if args.out:
        if scope == 'mmdet':
            from mmdet.evaluation import DumpDetResults as Dump
        else:
            from mmengine.evaluator import DumpResults as Dump
        runner.test_evaluator.metrics.append(Dump(out_file_path=args.out))
    metrics = runner.test()
    if runner.rank == 0:
        dataset = cfg.test_dataloader.dataset
        print(format_summary_table(scope, dataset.get('type', '?'), metrics,
                                   args.checkpoint))
    finish_distributed()


if __name__ == '__main__':
    main()
