#!/usr/bin/env python
"""``make demo``: inherit a small vision foundation model on this CPU.

    python tools/demo.py [--quick | --full | --long] [--fresh] \
        [--check-probes] [--work-dir work_dirs/demo] [--seed 0] \
        [--threads 2] [--jobs 2]

In the paper's setting: trains three purpose-specific teachers (mmdet Mask
R-CNN, mmseg Semantic FPN, a world classifier, all on the real pretrained
EfficientNet-Lite0) on a labelled split the user never sees, makes a
DINOv2-like knowledge-base ViT from EfficientNet-Lite0, caches every
teacher's outputs on the user's images, inherits a student from all of them
with ``kiv.KnowledgeInheritance`` (multi-task heads on the user's small
labelled split), exports it, and evaluates it with frozen-backbone probes
trained on the user's labelled split (logistic regression / k-NN, mmdet,
mmseg) against the same architecture trained from scratch on the user's
labels (the rival) and on the teachers' labels, with 95 % bootstrap
intervals, the labels and compute of each row, and its inherited heads
against the ground truth. Two stages run at once, one thread each. Stages
are cached in the work dir: a re-run reuses finished stages (``--fresh``
runs everything again); a changed preset, seed or config re-runs what
depends on it. The demo's package and configs are in projects/kiv_demo
(beside kiv, not installed with it). See docs/demo.md.
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


#: the demo's project folder (``projects/kiv_demo``): its package
#: ``kiv_demo`` and its configs live beside the library, not in it
DEMO_PROJECT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'projects',
    'kiv_demo')


def use_demo_project() -> None:
    """Make ``kiv_demo`` importable here and in any process started from
    here: its project folder goes first on ``sys.path`` and ``PYTHONPATH``.
    """
    if DEMO_PROJECT not in sys.path:
        sys.path.insert(0, DEMO_PROJECT)
    paths = os.environ.get('PYTHONPATH', '').split(os.pathsep)
    if DEMO_PROJECT not in paths:
        os.environ['PYTHONPATH'] = os.pathsep.join(
            [DEMO_PROJECT] + [p for p in paths if p])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's options (``argv``: default ``sys.argv[1:]``); the size
    flags set ``preset`` to a name of ``kiv_demo.presets.PRESETS``."""
    parser = argparse.ArgumentParser(
        description='Knowledge inheritance demo on CPU (cached stages)')
    size = parser.add_mutually_exclusive_group()
    parser.set_defaults(preset='default')

    def preset_flag(name: str, help: str) -> None:
        size.add_argument(f'--{name}', dest='preset', action='store_const',
                          const=name, help=help)

    preset_flag('quick',
                'smoke run of every stage (about 4.5 minutes on 2 cores; too '
                'short to compare rows)')
    preset_flag('full', 'default run plus the ablation rows')
    preset_flag('long', 'default run with a 4.8x longer inheritance (38,400 '
                'samples; about 35 minutes on 2 cores, 27 after a default '
                'run in the same work dir)')
    preset_flag('toy', 'a few images, 2 iterations per stage (tests)')
    parser.add_argument('--tune', action='store_true',
                        help='learning-rate sweep of the inherited student '
                        'and the rival (same grid, same rule) on a world '
                        'of its own (seed + 1000), in <work dir>/tune; '
                        'prints the table and exits')
    parser.add_argument('--check-probes', action='store_true',
                        help='also train the det / seg probes on a strong '
                        'and a weak backbone, and with twice the steps, and '
                        'report whether they separate them and whether any '
                        'row changes rank')
    parser.add_argument('--fresh', action='store_true',
                        help='ignore cached stages and run everything')
    parser.add_argument('--work-dir', default='work_dirs/demo',
                        help='where every output goes (default: '
                        'work_dirs/demo)')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument('--threads', type=int, default=2,
                        help='CPU threads in all, fixed for reproducible '
                        'numbers (default: 2)')
    parser.add_argument('--jobs', type=int, default=2,
                        help='stages run at once, each in its own process '
                        'with threads / jobs torch threads (default: 2: '
                        'one thread per stage, both cores busy)')
    parser.add_argument('--native-kernels', action='store_true',
                        help="use this CPU's fastest kernels (AVX-512 ...) "
                        'instead of the AVX2 ones pinned by default; the '
                        'numbers then depend on the CPU model')
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.threads < 1:
        sys.exit(f'error: --threads must be >= 1, got {args.threads}')
    if not 1 <= args.jobs <= args.threads:
        sys.exit(f'error: --jobs must be in 1..--threads ({args.threads}), '
                 f'got {args.jobs}')
    # the torch threads of each stage: part of every stage's fingerprint
    stage_threads = args.threads // args.jobs
    preset = args.preset
    os.environ.setdefault('OMP_NUM_THREADS', str(stage_threads))
    # busy-waiting OpenMP threads make a shared 2-core machine ~10x slower
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    if not args.native_kernels:
        # the same kernels on every x86-64 CPU with AVX2: the thread count,
        # ATen's vectorised kernels, oneDNN's convolutions, MKL's GEMM and
        # OpenCV's SIMD paths each change the numbers (docs/demo.md); AVX2
        # costs about 4 % here against AVX-512
        os.environ.setdefault('ATEN_CPU_CAPABILITY', 'avx2')
        os.environ.setdefault('ONEDNN_MAX_CPU_ISA', 'AVX2')
        os.environ.setdefault('MKL_CBWR', 'AVX2')
        import cv2
        cv2.setUseOptimized(False)  # plain C paths: the same pixels
    import torch
    torch.set_num_threads(stage_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    import kiv  # noqa: F401  registers kiv.*
    kiv.enable_safe_io()  # weights-only loads, atomic checkpoint writes
    use_demo_project()
    import kiv_demo  # noqa: F401  registers kiv_demo.*

    # the toolboxes' model zoos, which every stage's Runner imports (1.6 s
    # of CPU): imported once here, the forked stages share them
    import mmdet.models  # noqa: F401
    import mmpretrain.models  # noqa: F401
    import mmseg.models  # noqa: F401
    from kiv_demo.pipeline import build_tuning_stages, run_demo
    from kiv_demo.stages import run_stages

    work_dir = os.path.abspath(args.work_dir)
    if args.tune:
        tune_dir = os.path.join(work_dir, 'tune')
        print(f'kiv demo: learning-rate sweep, preset {preset}, world seed '
              f'{args.seed + 1000}, work dir {tune_dir}', flush=True)
        results = run_stages(build_tuning_stages(preset), tune_dir,
                             seed=args.seed + 1000, fresh=args.fresh,
                             jobs=args.jobs, threads=stage_threads)
        report = results['tune_report']
        print()
        print(report['markdown'])
        for kind, best in sorted(report['best'].items()):
            print(f'best {kind}: lr {best["lr"]:g}')
        return
    kernels = 'native kernels' if args.native_kernels else \
        'AVX2 kernels'
    print(f'kiv demo: preset {preset}, seed {args.seed}, {args.jobs} '
          f'stage(s) at once x {stage_threads} thread(s), {kernels}, work '
          f'dir {work_dir}', flush=True)
    start = time.monotonic()
    salt = dict(threads=stage_threads,
                kernels='native' if args.native_kernels else 'avx2')
    results = run_demo(preset, work_dir, seed=args.seed, fresh=args.fresh,
                       salt=salt, probe_check=args.check_probes,
                       jobs=args.jobs, threads=stage_threads)
    wall = time.monotonic() - start
    report = os.path.join(work_dir, 'report')
    print()
    print(results['report']['markdown'])
    print()
    print('\n'.join(results['report']['verdict']))
    print()
    print(f'tables: {report}/tables.md (json: tables.json), verdict: '
          f'{report}/verdict.md, stage times: {report}/stage_times.md')
    print(f'pictures: {report}/results.png, {report}/curves.png, '
          f'{report}/pca.png')
    print(f'exported inherited student: {work_dir}/inherit/student.pth')
    print(f'wall time {int(wall) // 60}:{int(wall) % 60:02d}')


if __name__ == '__main__':
    main()
