"""Side-by-side speed of RoIAlign: mmcv's kernel vs ``kiv.RoIAlign``.

One call = the forward and backward of one RoI layer over a training
batch's RoIs, as a two-stage detector's RoI head runs it: ``--batch`` maps
of ``--channels`` channels at ``--stride`` for ``--image-size`` px images,
``--rois`` boxes per image (random corners, side lengths log-uniform
between ``--min-box`` px and the image size, some across the border), a
``--output-size`` bin grid, adaptive sampling (mmdet's ``sampling_ratio=0``)
unless ``--sampling-ratio``. The two cases take turns, ``--repeats`` times
(:func:`kiv.utils.benchmark.measure_interleaved`), and the ratio of their
times is taken per repeat. The outputs and input gradients of the two are
compared first (largest absolute difference printed). See
docs/performance.md.

Example (the demo's Mask R-CNN: 8 images of 64 px, 64-channel FPN, 64
sampled RoIs per image, bbox and mask RoIs)::

    python tools/analysis/benchmark_roi_align.py --output-size 7
    python tools/analysis/benchmark_roi_align.py --output-size 14 --rois 16
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from typing import Optional

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import torch  # noqa: E402
from mmcv.ops import RoIAlign as MMCVRoIAlign  # noqa: E402

import kiv  # noqa: E402,F401  (registers kiv.*)
from kiv.models.layers import RoIAlign  # noqa: E402
from kiv.utils.benchmark import (BenchCase, CaseResult,  # noqa: E402
                                 RatioSpec, compute_ratio, cpu_model,
                                 format_ratios, format_table,
                                 measure_interleaved)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(
        description="RoIAlign forward + backward: mmcv's kernel vs "
        'kiv.RoIAlign, interleaved',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--batch', type=int, default=8, help='images')
    parser.add_argument('--image-size', type=int, default=64, help='px')
    parser.add_argument('--stride', type=int, default=4,
                        help='stride of the pooled map')
    parser.add_argument('--channels', type=int, default=64)
    parser.add_argument('--rois', type=int, default=64,
                        help='RoIs per image')
    parser.add_argument('--min-box', type=float, default=4.0,
                        help='smallest box side, px')
    parser.add_argument('--output-size', type=int, default=7)
    parser.add_argument('--sampling-ratio', type=int, default=0)
    parser.add_argument('--iters', type=int, default=10,
                        help='calls per repeat')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    for name in ('batch', 'image_size', 'stride', 'channels', 'rois',
                 'output_size', 'iters', 'repeats', 'threads'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    if not 0 < args.min_box <= args.image_size:
        parser.error('--min-box must be in (0, --image-size]')
    return args


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor,
                                                   torch.Tensor]:
    """The feature maps ``(batch, C, h, w)`` and RoIs ``(batch * rois, 5)``.
    """
    g = torch.Generator().manual_seed(args.seed)
    side = math.ceil(args.image_size / args.stride)
    feats = torch.randn(args.batch, args.channels, side, side, generator=g)
    n = args.batch * args.rois
    log_lo, log_hi = math.log(args.min_box), math.log(args.image_size)
    wh = torch.exp(log_lo + torch.rand(n, 2, generator=g) *
                   (log_hi - log_lo))
    xy = torch.rand(n, 2, generator=g) * (args.image_size - wh * 0.8)
    idx = torch.arange(args.batch).repeat_interleave(args.rois).float()
    return feats, torch.cat([idx[:, None], xy, xy + wh], 1)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; prints the tables."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    feats, rois = make_inputs(args)
    options = dict(output_size=args.output_size,
                   spatial_scale=1.0 / args.stride,
                   sampling_ratio=args.sampling_ratio)
    layers = {'mmcv_roi_align': MMCVRoIAlign(**options),
              'kiv_roi_align': RoIAlign(**options)}
    grad_out = torch.randn(rois.shape[0], args.channels, args.output_size,
                           args.output_size,
                           generator=torch.Generator().manual_seed(1))

    def step(layer):
        inp = feats.clone().requires_grad_()
        out = layer(inp, rois)
        out.backward(grad_out)
        return out.detach(), inp.grad

    ref, got = (step(layer) for layer in layers.values())
    print(f'max |kiv - mmcv|: output {(got[0] - ref[0]).abs().max():.2e}, '
          f'input gradient {(got[1] - ref[1]).abs().max():.2e} '
          f'(output scale {ref[0].abs().max():.2e})')
    labels = {'mmcv_roi_align': "mmcv's RoIAlign, forward + backward",
              'kiv_roi_align': 'kiv.RoIAlign, forward + backward'}
    cases = [BenchCase(name, labels[name], args.batch,
                       step=lambda layer=layer: step(layer),
                       calls=args.iters)
             for name, layer in layers.items()]
    times = measure_interleaved(cases, warmup=2, repeats=args.repeats)
    results = {c.name: CaseResult(c.name, c.label, images=c.images,
                                  seconds=times[c.name]) for c in cases}
    ratio = compute_ratio(
        RatioSpec("kiv.RoIAlign / mmcv's RoIAlign", ['kiv_roi_align'],
                  ['mmcv_roi_align'], '< 1'), results)
    print(f'{cpu_model()}, '
          f'{torch.get_num_threads()} thread(s); {args.batch} x '
          f'{args.channels} x {feats.shape[-1]}^2 maps, {rois.shape[0]} '
          f'RoIs, {args.output_size}^2 bins, sampling_ratio '
          f'{args.sampling_ratio} ("img" = one image\'s RoIs)')
    print(format_table(list(results.values())))
    print()
    print(format_ratios([ratio]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
