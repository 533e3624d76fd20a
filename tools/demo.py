#!/usr/bin/env python
"""``make demo``: inherit a small vision foundation model on this CPU.

    python tools/demo.py [--quick | --full] [--fresh] \
        [--work-dir work_dirs/demo] [--seed 0] [--threads 2]

Trains two purpose-specific teachers (mmdet Mask R-CNN, mmseg FPN) on a
procedural world, makes a DINOv2-like knowledge-base ViT from the real
pretrained EfficientNet-Lite0, inherits a student from all of them with
``kiv.KnowledgeInheritance``, exports it, and evaluates it against a
from-scratch baseline and the knowledge base alone with mmpretrain, mmdet
and mmseg metrics. Stages are cached in the work dir: a re-run reuses
finished stages (``--fresh`` runs everything again); a changed preset, seed
or config re-runs what depends on it. See docs/demo.md.
"""
import argparse
import os
import sys
import time
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
warnings.filterwarnings('ignore', category=UserWarning)
warnings.filterwarnings('ignore', category=FutureWarning)
warnings.filterwarnings('ignore', category=DeprecationWarning)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Knowledge inheritance demo on CPU (cached stages)')
    size = parser.add_mutually_exclusive_group()
    size.add_argument('--quick', action='store_true',
                      help='smaller run (about 5 minutes on 2 cores)')
    size.add_argument('--full', action='store_true',
                      help='default run plus the ablation rows')
    size.add_argument('--toy', action='store_true',
                      help='a few images, 2 iterations per stage (tests)')
    parser.add_argument('--fresh', action='store_true',
                        help='ignore cached stages and run everything')
    parser.add_argument('--work-dir', default='work_dirs/demo',
                        help='where every output goes (default: '
                        'work_dirs/demo)')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument('--threads', type=int, default=2,
                        help='torch CPU threads, fixed for reproducible '
                        'numbers (default: 2)')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads < 1:
        sys.exit(f'error: --threads must be >= 1, got {args.threads}')
    preset = ('quick' if args.quick else 'full' if args.full else
              'toy' if args.toy else 'default')
    os.environ.setdefault('OMP_NUM_THREADS', str(args.threads))
    # busy-waiting OpenMP threads make a shared 2-core machine ~10x slower
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    import torch
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    import kiv  # noqa: F401  registers kiv.*
    kiv.enable_safe_io()  # weights-only loads, atomic checkpoint writes
    import kiv.demo  # noqa: F401  registers kiv.PlainViTStudent
    from kiv.demo.pipeline import run_demo

    work_dir = os.path.abspath(args.work_dir)
    print(f'kiv demo: preset {preset}, seed {args.seed}, {args.threads} '
          f'threads, work dir {work_dir}', flush=True)
    start = time.monotonic()
    results = run_demo(preset, work_dir, seed=args.seed, fresh=args.fresh)
    wall = time.monotonic() - start
    report = os.path.join(work_dir, 'report')
    print()
    print(results['report']['markdown'])
    print()
    print(f'table: {report}/table.md, {report}/table.png')
    print(f'pictures: {report}/curves.png, {report}/pca.png')
    print(f'exported inherited student: {work_dir}/inherit/student.pth')
    print(f'wall time {int(wall) // 60}:{int(wall) % 60:02d}')


if __name__ == '__main__':
    main()
