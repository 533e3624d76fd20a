#!/usr/bin/env python
"""Speed of the student, the distillation step and the teacher cache,
measured side by side in one run on this machine.

Examples::

    # CI size, seconds
    python tools/analysis/benchmark.py --arch tiny --memory none
    # ViT-B/14-reg4 student, 2 ViT-B teachers, batch 4 at 224 px
    python tools/analysis/benchmark.py --arch base --batch-size 4 \\
        --iters 3 --repeats 3 --out work_dirs/benchmark/base.json

Cases (random weights; nothing is downloaded):

(a) ``timm_fwd`` / ``timm_train``: the bare timm ViT of the student's base,
    forward (no grad) and full train step (every weight, AdamW);
(b) ``adapter_fwd`` / ``adapter_train``: ``kiv.AdapterViT`` (same base +
    ViT-Adapter) ``forward_features``, and its train step with the base
    frozen;
(c) ``teachers_fwd``: the two teachers (DINOv2-like = the student's base,
    CLIP-like ViT-B/16) on the batch; ``distill_online``: one
    ``kiv.KnowledgeInheritance`` train step with those teachers online;
(d) ``distill_cached``: the same step from the teacher-feature cache
    (``kiv.CachedTeacher`` reading the targets from the data samples; no
    teacher in memory);
(e) ``cache_write``: ``kiv``'s cache writer over ``batch x iters`` images
    (teachers + fp16 shards + exact statistics + index).

Every case runs ``--iters`` calls per repeat, the cases take turns,
``--repeats`` times; the table gives the median img/s with its min-max,
counted GFLOP per image (``FlopCounterMode``: matrix products,
convolutions, attention) and achieved GFLOP/s, and the peak memory of the
case measured in a fresh process (``--memory``). Data loading is not
timed: each step gets an already collated batch. See docs/performance.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import os.path as osp
import platform
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# mmengine 0.10 and mmcv import pkg_resources, which warns on every start.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import numpy as np  # noqa: E402
import torch  # noqa: E402

import kiv  # noqa: E402,F401  (registers kiv.*)
from kiv.utils.benchmark import (BenchCase, CaseResult,  # noqa: E402
                                 RatioSpec, compute_ratio, count_flops,
                                 format_ratios, format_table,
                                 measure_interleaved, peak_rss_bytes,
                                 rss_bytes, synchronize)

IMAGENET_NORM = dict(mean=[123.675, 116.28, 103.53],
                     std=[58.395, 57.12, 57.375])
CLIP_NORM = dict(mean=[122.771, 116.746, 104.094],
                 std=[68.501, 66.632, 70.323])


@dataclass(frozen=True)
class Arch:
    """A model size of the benchmark.

    Attributes:
        vit (str): timm name of the student's base (= the DINOv2-like
            teacher).
        clip (str): timm name of the CLIP-like teacher.
        vit_kwargs (dict): ``timm.create_model`` overrides of both.
        adapter (dict): ``kiv.AdapterViT`` adapter options.
        hidden_dim (int): student-to-teacher head width.
        img_size (int): default image size.
        batch_size (int): default batch size.
    """
    vit: str
    clip: str
    vit_kwargs: dict = field(default_factory=dict)
    adapter: dict = field(default_factory=dict)
    hidden_dim: int = 1280
    img_size: int = 224
    batch_size: int = 4


#: ``base`` is the real recipe's student (configs/distill/kiv_adapter-vit-
#: b14-reg4_*.py: DINOv2 ViT-B/14-reg4, 12 deformable heads, deform_ratio
#: 0.5) without gradient checkpointing and with BN instead of SyncBN.
_VIT_ADAPTER = dict(interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
                    conv_inplane=64, n_points=4, cffn_ratio=0.25,
                    deform_ratio=0.5, with_global_token=True)
ARCHS: dict[str, Arch] = {
    'tiny': Arch(
        'vit_small_patch14_reg4_dinov2', 'vit_base_patch16_clip_224',
        vit_kwargs=dict(embed_dim=64, depth=4, num_heads=2),
        adapter=dict(interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
                     conv_inplane=16, deform_num_heads=2, n_points=2,
                     cffn_ratio=0.25),
        hidden_dim=64, img_size=56, batch_size=2),
    'small': Arch(
        'vit_small_patch14_reg4_dinov2', 'vit_base_patch16_clip_224',
        vit_kwargs=dict(embed_dim=384, num_heads=6),
        adapter=dict(_VIT_ADAPTER, deform_num_heads=6, drop_path_rate=0.1),
        hidden_dim=1024),
    'base': Arch(
        'vit_base_patch14_reg4_dinov2', 'vit_base_patch16_clip_224',
        adapter=dict(_VIT_ADAPTER, deform_num_heads=12, drop_path_rate=0.1),
        hidden_dim=1280),
}

CASES = ('timm_fwd', 'timm_train', 'adapter_fwd', 'adapter_train',
         'teachers_fwd', 'distill_online', 'distill_cached', 'cache_write')
GROUPS = {'timm_fwd': '(a)', 'timm_train': '(a)', 'adapter_fwd': '(b)',
          'adapter_train': '(b)', 'teachers_fwd': '(c)',
          'distill_online': '(c)', 'distill_cached': '(d)',
          'cache_write': '(e)'}
LABELS = {
    'timm_fwd': 'timm ViT forward',
    'timm_train': 'timm ViT train step (all weights)',
    'adapter_fwd': 'kiv.AdapterViT forward_features',
    'adapter_train': 'kiv.AdapterViT train step (base frozen)',
    'teachers_fwd': 'teachers forward (2)',
    'distill_online': 'distillation step, teachers online',
    'distill_cached': 'distillation step from the teacher cache',
    'cache_write': 'cache writing (teachers + shards + statistics)',
}
RATIOS = (
    RatioSpec('adapter fwd / timm fwd', ['adapter_fwd'], ['timm_fwd'],
              '<= 1.25'),
    RatioSpec('adapter train (frozen base) / timm train (all)',
              ['adapter_train'], ['timm_train'], '< 1'),
    RatioSpec('cached distill step / student-only train step',
              ['distill_cached'], ['adapter_train'], '<= 1.1'),
    RatioSpec('online distill step / (teachers fwd + student step)',
              ['distill_online'], ['teachers_fwd', 'adapter_train'],
              '<= 1.05'),
    RatioSpec('cache writing / teachers fwd', ['cache_write'],
              ['teachers_fwd'], '<= 1.1'),
)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command line (``--memory-worker`` is internal)."""
    parser = argparse.ArgumentParser(
        description='Side-by-side speed of timm ViT, kiv.AdapterViT, the '
        'distillation step (online / from the cache) and cache writing',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--arch', choices=sorted(ARCHS), default='base',
                        help='model size')
    parser.add_argument('--batch-size', type=int,
                        help='images per step (default: 2 tiny, 4 small/'
                        'base)')
    parser.add_argument('--img-size', type=int,
                        help='image side (default: 56 tiny, 224 small/base)')
    parser.add_argument('--iters', type=int, default=3,
                        help='timed calls per case and repeat')
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed calls per case first')
    parser.add_argument('--repeats', type=int, default=3,
                        help='interleaved repeats (median, min-max)')
    parser.add_argument('--cases', default=','.join(CASES),
                        help='comma-separated subset of ' + ', '.join(CASES))
    parser.add_argument('--device', default=None,
                        help='cpu or cuda[:i] (default: cuda if available)')
    parser.add_argument('--threads', type=int,
                        help='torch CPU threads (default: torch default)')
    parser.add_argument('--clock', choices=['wall', 'cpu'], default='wall',
                        help='wall time, or process CPU time (all threads; '
                        'steadier on a shared machine)')
    parser.add_argument('--memory', choices=['auto', 'rss', 'cuda', 'none'],
                        default='auto',
                        help='peak memory per case, each in a fresh '
                        'process: rss = growth of ru_maxrss over the '
                        'interpreter after imports (CPU), cuda = '
                        'torch.cuda.max_memory_allocated; auto = cuda on a '
                        'GPU, else rss')
    parser.add_argument('--no-flops', action='store_true',
                        help='skip FLOP counting')
    parser.add_argument('--work-dir',
                        help='where weights, images and the cache go '
                        '(default: a temporary directory, removed after)')
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--quiet', action='store_true',
                        help='no progress lines')
    parser.add_argument('--memory-worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    arch = ARCHS[args.arch]
    args.batch_size = args.batch_size or arch.batch_size
    args.img_size = args.img_size or arch.img_size
    args.cases = [c.strip() for c in args.cases.split(',') if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f'unknown cases {unknown}; choose from {list(CASES)}')
    for name in ('batch_size', 'img_size', 'iters', 'repeats'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    if args.warmup < 0:
        parser.error('--warmup must be >= 0')
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.memory == 'auto':
        args.memory = 'cuda' if args.device.startswith('cuda') else 'rss'
    if args.memory == 'cuda' and not args.device.startswith('cuda'):
        parser.error('--memory cuda needs --device cuda')
    return args


# ---------------------------------------------------------------- workspace
def _teacher_cache_api() -> tuple[Optional[dict], Optional[str]]:
    """The teacher-cache functions (d) and (e) need, or why not."""
    try:
        from kiv.datasets.teacher_cache import (TeacherCacheWriter,
                                                load_statistics, read_index,
                                                use_teacher_cache)
        from kiv.datasets.teacher_cache.format import STATISTICS_FILE
    except ImportError as err:
        return None, f'kiv has no teacher-feature cache API ({err})'
    return dict(writer=TeacherCacheWriter, use=use_teacher_cache,
                read_index=read_index, load_statistics=load_statistics,
                statistics_file=STATISTICS_FILE), None


class Workspace:
    """Files the cases share: teacher/base weights (random), images, the
    distillation config and the teacher cache.

    Args:
        root (str): the directory.
        args (argparse.Namespace): benchmark options.
    """

    def __init__(self, root: str, args: argparse.Namespace) -> None:
        self.root = root
        self.args = args
        self.arch = ARCHS[args.arch]
        self.image_dir = osp.join(root, 'images')
        self.dinov2_ckpt = osp.join(root, 'dinov2.pth')
        self.clip_ckpt = osp.join(root, 'clip.pth')
        self.cache_dir = osp.join(root, 'cache')
        self.num_images = args.batch_size * args.iters
        # CLIP-like teacher input: the image size rounded up to its patch
        self.clip_size = -(-args.img_size // 16) * 16
        self.cache_api, self.cache_error = _teacher_cache_api()

    # ------------------------------------------------------------ files
    def vit_kwargs(self) -> dict:
        """timm kwargs of the student's base / DINOv2-like teacher."""
        kwargs = dict(self.arch.vit_kwargs)
        if self.args.arch == 'tiny':
            kwargs['img_size'] = self.args.img_size
        return kwargs

    def clip_kwargs(self) -> dict:
        """timm kwargs of the CLIP-like teacher (no head)."""
        return dict(self.arch.vit_kwargs, img_size=self.clip_size,
                    num_classes=0)

    def prepare(self, need_cache: bool, log: Callable[[str], None]) -> None:
        """Write what is missing: weights, images, and (if ``need_cache``
        and the API exists) the teacher cache of the images.

        Args:
            need_cache (bool): write the cache for ``distill_cached``.
            log (Callable[[str], None]): progress messages.
        """
        import timm
        os.makedirs(self.root, exist_ok=True)
        torch.manual_seed(self.args.seed)
        if not osp.isfile(self.dinov2_ckpt):
            model = timm.create_model(self.arch.vit, pretrained=False,
                                      num_classes=0, dynamic_img_size=True,
                                      **self.vit_kwargs())
            torch.save(model.state_dict(), self.dinov2_ckpt)
        if not osp.isfile(self.clip_ckpt):
            model = timm.create_model(self.arch.clip, pretrained=False,
                                      **self.clip_kwargs())
            torch.save(model.state_dict(), self.clip_ckpt)
        self._write_images()
        if need_cache and self.cache_api is not None and not osp.isfile(
                osp.join(self.cache_dir, 'index.json')):
            log(f'writing the teacher cache of {self.num_images} images')
            try:
                self.write_cache(self.cache_dir)
            except Exception as err:  # reported in the table, not hidden
                self.cache_error = ('the teacher cache could not be written '
                                    f'({type(err).__name__}: {err})')
                traceback.print_exc()

    def _write_images(self) -> None:
        """``num_images`` smooth random RGB images (PNG)."""
        import cv2
        os.makedirs(self.image_dir, exist_ok=True)
        rng = np.random.default_rng(self.args.seed)
        size = self.args.img_size
        for i in range(self.num_images):
            path = osp.join(self.image_dir, f'{i:05d}.png')
            if osp.isfile(path):
                continue
            small = rng.integers(0, 256, (max(size // 8, 2), ) * 2 + (3, ),
                                 dtype=np.uint8)
            img = cv2.resize(small, (size, size),
                             interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(path, img)

    def distill_config(self) -> Any:
        """The distillation config of the cases (c), (d), (e).

        Returns:
            mmengine.config.Config: a ``kiv.KnowledgeInheritance`` with the
            student (``kiv.AdapterViT`` on the DINOv2-like weights), the
            DINOv2-like and CLIP-like teachers, PHI-S with fixed statistics,
            no gradient-share diagnostics, and an image-folder train
            dataloader over the workspace images.
        """
        from mmengine.config import Config
        size = self.args.img_size
        teachers = dict(
            dinov2=dict(
                type='kiv.Teacher',
                source=dict(type='timm', model_name=self.arch.vit,
                            checkpoint=self.dinov2_ckpt,
                            model_kwargs=dict(dynamic_img_size=True,
                                              num_classes=0,
                                              **self.vit_kwargs())),
                input_size=size, pad_to_multiple=14,
                forward_method='forward_features',
                summary=dict(type='cls'), **IMAGENET_NORM),
            clip=dict(
                type='kiv.Teacher',
                source=dict(type='timm', model_name=self.arch.clip,
                            checkpoint=self.clip_ckpt,
                            model_kwargs=self.clip_kwargs()),
                input_size=self.clip_size, pad_to_multiple=16,
                forward_method='forward_features',
                summary=dict(type='cls'), **CLIP_NORM))
        model = dict(
            type='kiv.KnowledgeInheritance',
            base_teacher='dinov2',
            student=dict(type='kiv.AdapterViT',
                         base=dict(type='timm', model_name=self.arch.vit,
                                   checkpoint=self.dinov2_ckpt,
                                   model_kwargs=self.vit_kwargs()),
                         summary_names=['dinov2', 'clip'],
                         **self.arch.adapter),
            student_mean=IMAGENET_NORM['mean'],
            student_std=IMAGENET_NORM['std'],
            teachers=teachers,
            latent=dict(type='kiv.SharedLatentSpace', standardize='phis',
                        statistics='fixed', hidden_dim=self.arch.hidden_dim,
                        teachers=dict(clip=dict(student_levels=[2]))),
            grad_share_interval=0)
        pipeline = [
            dict(type='kiv.LoadImageFromFileSafe'),
            dict(type='mmcv.Resize', scale=(size, size), keep_ratio=False),
            dict(type='mmcv.RandomFlip', prob=0.5),
            dict(type='kiv.PackImageInputs'),
        ]
        train_dataloader = dict(
            batch_size=self.args.batch_size, num_workers=0,
            persistent_workers=False,
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='pseudo_collate'),
            dataset=dict(type='kiv.UnlabeledImageDataset',
                         data_root=self.image_dir, pipeline=pipeline))
        return Config(dict(default_scope='kiv', model=model,
                           train_dataloader=train_dataloader))

    def new_writer(self, out_dir: str) -> Any:
        """A prepared (teachers built, outputs measured) cache writer.

        Args:
            out_dir (str): the cache directory to write.

        Returns:
            TeacherCacheWriter: ready to ``run``.
        """
        writer = self.cache_api['writer'](
            self.distill_config(), out_dir, views=1, dtype='fp16',
            seed=self.args.seed, batch_size=self.args.batch_size,
            num_workers=0, device=self.args.device,
            log=lambda msg: None)
        writer.prepare()
        return writer

    def write_cache(self, out_dir: str) -> None:
        """Write the cache of the workspace images to ``out_dir``."""
        with _quiet_stdout():
            self.new_writer(out_dir).run(check_space=False)


@contextlib.contextmanager
def _quiet_stdout():
    """Silence the file descriptor 1 (progress bars bound to sys.stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, 'w') as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


# -------------------------------------------------------------------- cases
def _loss(outputs: Any) -> torch.Tensor:
    """Mean square of every output tensor (a stand-in training loss)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float().pow(2).mean()
    tensors = [outputs.summary] + list(outputs.features) \
        if hasattr(outputs, 'features') else list(outputs)
    return sum(t.float().pow(2).mean() for t in tensors if t is not None)


class CaseBuilder:
    """Builds the benchmark cases, sharing models where timing allows.

    Args:
        ws (Workspace): the prepared workspace.
        args (argparse.Namespace): benchmark options.
    """

    def __init__(self, ws: Workspace, args: argparse.Namespace) -> None:
        self.ws = ws
        self.args = args
        self.device = torch.device(args.device)
        self.shared: dict[str, Any] = {}
        gen = torch.Generator().manual_seed(args.seed)
        self.images = torch.randn(args.batch_size, 3, args.img_size,
                                  args.img_size,
                                  generator=gen).to(self.device)

    def build(self, name: str) -> BenchCase:
        """The case ``name`` (unavailable cases carry the reason).

        Args:
            name (str): one of :data:`CASES`.

        Returns:
            BenchCase: ready to time.
        """
        case = BenchCase(name, LABELS[name], self.args.batch_size,
                         calls=self.args.iters, group=GROUPS[name])
        getattr(self, f'_{name}')(case)
        return case

    # (a) ---------------------------------------------------------------
    def _timm(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        if 'timm' not in self.shared:
            import timm
            model = timm.create_model(
                self.ws.arch.vit, pretrained=False, num_classes=0,
                dynamic_img_size=True, **self.ws.vit_kwargs()).to(
                    self.device)
            optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
            self.shared['timm'] = (model, optim)
        return self.shared['timm']

    def _timm_fwd(self, case: BenchCase) -> None:
        case.step = self._forward_step(self._timm()[0])

    def _timm_train(self, case: BenchCase) -> None:
        case.step = self._train_step(*self._timm())

    # (b) ---------------------------------------------------------------
    def _adapter(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        if 'adapter' not in self.shared:
            from kiv.models.backbones import AdapterViT
            model = AdapterViT(
                base=dict(type='timm', model_name=self.ws.arch.vit,
                          checkpoint=self.ws.dinov2_ckpt,
                          model_kwargs=self.ws.vit_kwargs()),
                **self.ws.arch.adapter).to(self.device)
            optim = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=1e-4)
            self.shared['adapter'] = (model, optim)
        return self.shared['adapter']

    def _adapter_fwd(self, case: BenchCase) -> None:
        case.step = self._forward_step(self._adapter()[0])

    def _adapter_train(self, case: BenchCase) -> None:
        case.step = self._train_step(*self._adapter())

    def _forward_step(self, model: torch.nn.Module) -> Callable[[], None]:
        """One inference ``forward_features`` of the benchmark batch."""

        def step() -> None:
            model.eval()
            with torch.no_grad():
                model.forward_features(self.images)

        return step

    def _train_step(self, model: torch.nn.Module,
                    optim: torch.optim.Optimizer) -> Callable[[], None]:
        """One training step of ``forward_features`` (forward, backward,
        AdamW step) on the benchmark batch."""

        def step() -> None:
            model.train()
            _loss(model.forward_features(self.images)).backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

        return step

    # (c) ---------------------------------------------------------------
    def _distiller(self, cfg: Any) -> tuple[Any, Any]:
        """Build a distiller from ``cfg`` with an AdamW optim wrapper."""
        from mmengine.optim import OptimWrapper
        from mmengine.registry import DefaultScope

        from kiv.registry import MODELS
        with DefaultScope.overwrite_default_scope('kiv'):
            model = MODELS.build(copy.deepcopy(cfg.model))
        model.to(self.device).train()
        wrapper = OptimWrapper(torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-4))
        return model, wrapper

    def _batch(self, dataset_cfg: dict) -> dict:
        """The first ``batch_size`` samples of a dataset, collated."""
        from mmengine.dataset import pseudo_collate
        from mmengine.registry import DefaultScope

        from kiv.registry import DATASETS
        with DefaultScope.overwrite_default_scope('kiv'):
            dataset = DATASETS.build(copy.deepcopy(dataset_cfg))
        return pseudo_collate(
            [dataset[i] for i in range(self.args.batch_size)])

    def _online(self) -> tuple[Any, Any, dict]:
        if 'online' not in self.shared:
            cfg = self.ws.distill_config()
            model, wrapper = self._distiller(cfg)
            data = self._batch(cfg.train_dataloader.dataset)
            if hasattr(model, 'statistic_sums') and \
                    hasattr(model, 'load_statistics'):
                # fixed statistics, as after the warm-up of a real run
                inputs = model.data_preprocessor(data, False)
                model.load_statistics(model.statistic_sums(
                    inputs['inputs'], inputs['data_samples']))
            self.shared['online'] = (model, wrapper, data)
        return self.shared['online']

    def _teachers_fwd(self, case: BenchCase) -> None:
        if 'online' in self.shared:
            model = self.shared['online'][0]
            teachers, preprocess = model.teachers, model.data_preprocessor
            data = self.shared['online'][2]
        else:  # alone (memory worker): only the teachers in memory
            from mmengine.model import ImgDataPreprocessor
            from mmengine.registry import DefaultScope

            from kiv.registry import MODELS
            cfg = self.ws.distill_config()
            with DefaultScope.overwrite_default_scope('kiv'):
                teachers = torch.nn.ModuleDict({
                    name: MODELS.build(copy.deepcopy(t))
                    for name, t in cfg.model.teachers.items()
                }).to(self.device)
            # the distiller's default data preprocessor
            preprocess = ImgDataPreprocessor(bgr_to_rgb=True).to(self.device)
            data = self._batch(cfg.train_dataloader.dataset)
        images = preprocess(data, False)['inputs']

        def step() -> None:
            with torch.no_grad():
                for teacher in teachers.values():
                    teacher(images)

        case.step = step

    def _distill_online(self, case: BenchCase) -> None:
        model, wrapper, data = self._online()
        case.step = lambda: model.train_step(data, wrapper)

    # (d) ---------------------------------------------------------------
    def _distill_cached(self, case: BenchCase) -> None:
        ws = self.ws
        if ws.cache_api is None or ws.cache_error:
            case.unavailable = ws.cache_error or 'no teacher cache'
            return
        if not osp.isfile(osp.join(ws.cache_dir, 'index.json')):
            case.unavailable = f'no teacher cache in {ws.cache_dir}'
            return
        api = ws.cache_api
        cfg = api['use'](ws.distill_config(), ws.cache_dir)
        model, wrapper = self._distiller(cfg)
        index = api['read_index'](ws.cache_dir)
        sums = api['load_statistics'](
            osp.join(ws.cache_dir, api['statistics_file']),
            index['cache_id'])
        model.load_statistics(sums)
        data = self._batch(cfg.train_dataloader.dataset)
        case.step = lambda: model.train_step(data, wrapper)

    # (e) ---------------------------------------------------------------
    def _cache_write(self, case: BenchCase) -> None:
        ws = self.ws
        if ws.cache_api is None:
            case.unavailable = ws.cache_error
            return
        state: dict[str, Any] = {'calls': 0}
        case.images = ws.num_images
        case.calls = 1

        def before_call() -> None:
            state.pop('writer', None)
            out = osp.join(ws.root, 'cache_write')
            shutil.rmtree(out, ignore_errors=True)
            state['writer'] = ws.new_writer(out)

        def step() -> None:
            with _quiet_stdout():
                state['writer'].run(check_space=False)

        case.before_call = before_call
        case.step = step


# ------------------------------------------------------------------ running
def _log(args: argparse.Namespace) -> Callable[[str], None]:
    if args.quiet:
        return lambda msg: None
    return lambda msg: print(f'[benchmark] {msg}', file=sys.stderr,
                             flush=True)


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def _initialise_kernels(device: str) -> None:
    """Run tiny convolution, matrix product, attention and embedding-bag
    steps (forward + backward), so the libraries' one-time set-up (thread
    pools, oneDNN / BLAS state) is in the memory baseline, not in the first
    case."""
    x = torch.randn(1, 3, 16, 16, device=device, requires_grad=True)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).to(device)
    tokens = conv(x).flatten(2).transpose(1, 2)
    attn = torch.nn.functional.scaled_dot_product_attention(
        tokens[:, None], tokens[:, None], tokens[:, None])
    table = torch.randn(16, 8, device=device, requires_grad=True)
    bag = torch.nn.functional.embedding_bag(
        torch.zeros(4, 2, dtype=torch.long, device=device), table,
        per_sample_weights=torch.ones(4, 2, device=device), mode='sum')
    (attn.sum() + torch.nn.Linear(8, 8).to(device)(bag).sum()).backward()


def memory_worker(args: argparse.Namespace) -> None:
    """Peak memory of one case in this fresh process (one JSON line).

    Builds the case, runs one warm-up call and one measured call; prints
    ``{"case": ..., "peak_bytes": ...}``: ``torch.cuda.max_memory_allocated``
    on a GPU, else the growth of the peak RSS over the process after
    imports (weights, activations, optimizer state, allocator caches).
    """
    _set_threads(args)
    _quiet_mmengine()
    _initialise_kernels(args.device)
    baseline = rss_bytes()
    cuda = args.memory == 'cuda'
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    ws = Workspace(args.work_dir, args)
    case = CaseBuilder(ws, args).build(args.memory_worker)
    peak = None
    if case.available:
        for _ in range(2):
            if case.before_call is not None:
                case.before_call()
            case.step()
            synchronize(args.device)
        peak = torch.cuda.max_memory_allocated(args.device) if cuda \
            else peak_rss_bytes() - baseline
    print(json.dumps(dict(case=case.name, peak_bytes=peak,
                          unavailable=case.unavailable)), flush=True)


def measure_memory(args: argparse.Namespace, cases: list[str],
                   work_dir: str,
                   log: Callable[[str], None]) -> dict[str, Optional[int]]:
    """Run one memory worker per case.

    Returns:
        dict[str, int | None]: case -> peak bytes (None if it failed).
    """
    forwarded = ['--arch', args.arch, '--batch-size', str(args.batch_size),
                 '--img-size', str(args.img_size), '--iters',
                 str(args.iters), '--device', args.device, '--memory',
                 args.memory, '--seed', str(args.seed), '--work-dir',
                 work_dir]
    if args.threads:
        forwarded += ['--threads', str(args.threads)]
    peaks: dict[str, Optional[int]] = {}
    for name in cases:
        log(f'memory of {name} (fresh process)')
        proc = subprocess.run(
            [sys.executable, osp.abspath(__file__), *forwarded,
             '--memory-worker', name],
            capture_output=True, text=True)
        try:
            peaks[name] = json.loads(
                proc.stdout.strip().splitlines()[-1])['peak_bytes']
        except (IndexError, ValueError, KeyError):
            peaks[name] = None
            log(f'memory worker of {name} failed (exit {proc.returncode}):'
                f' {proc.stderr.strip()[-2000:]}')
    return peaks


def machine_info(args: argparse.Namespace) -> dict:
    """Where and when the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds'),
        host=platform.node(), python=platform.python_version(),
        torch=torch.__version__, kiv=getattr(kiv, '__version__', None),
        cpu=cpu, cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(), device=args.device,
        load_average=os.getloadavg() if hasattr(os, 'getloadavg') else None)
    if args.device.startswith('cuda'):
        info['gpu'] = torch.cuda.get_device_name(args.device)
    return info


def _quiet_mmengine() -> None:
    """Make the current mmengine logger drop INFO messages of the builders
    (they print to stdout, where the tables go)."""
    from mmengine.logging import MMLogger
    MMLogger.get_instance('kiv_benchmark', log_level='WARNING')


def run(args: argparse.Namespace) -> dict:
    """Prepare, measure memory, time, count FLOPs; print and return all.

    Returns:
        dict: ``meta`` (machine, options), ``cases`` and ``ratios``.
    """
    log = _log(args)
    _quiet_mmengine()
    _set_threads(args)
    torch.manual_seed(args.seed)
    created = args.work_dir is None
    work_dir = args.work_dir or tempfile.mkdtemp(prefix='kiv-benchmark-')
    try:
        ws = Workspace(work_dir, args)
        ws.prepare('distill_cached' in args.cases, log)
        peaks = measure_memory(args, args.cases, work_dir, log) \
            if args.memory != 'none' else {}

        builder = CaseBuilder(ws, args)
        # build the online distiller before the teachers case (shared)
        order = sorted(args.cases, key=lambda n: n != 'distill_online')
        built = {name: builder.build(name) for name in order}
        cases = [built[name] for name in args.cases]
        log('timing ' + ', '.join(c.name for c in cases if c.available))
        times = measure_interleaved(cases, args.warmup, args.repeats,
                                    args.device, args.clock, log)
        results = {}
        for case in cases:
            res = CaseResult(case.name, case.label, case.group, case.images,
                             times.get(case.name, []),
                             peak_memory=peaks.get(case.name),
                             unavailable=case.unavailable)
            if case.available and not args.no_flops:
                if case.before_call is not None:
                    case.before_call()
                res.flops = count_flops(case.step)
            results[case.name] = res
    finally:
        if created:
            shutil.rmtree(work_dir, ignore_errors=True)
    ratios = [compute_ratio(spec, results) for spec in RATIOS]
    meta = dict(machine_info(args), arch=args.arch,
                batch_size=args.batch_size, img_size=args.img_size,
                iters=args.iters, warmup=args.warmup, repeats=args.repeats,
                clock=args.clock, memory=args.memory)
    return dict(meta=meta, cases=[r.to_dict() for r in results.values()],
                ratios=[r.to_dict() for r in ratios],
                table=format_table(list(results.values())),
                ratio_table=format_ratios(ratios))


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return
    report = run(args)
    meta = report['meta']
    print(f"kiv benchmark: --arch {meta['arch']}, batch {meta['batch_size']}"
          f", {meta['img_size']} px, {meta['device']} "
          f"({meta['cpu']}, {meta['threads']} threads), {meta['clock']} "
          f"clock, {meta['repeats']} repeats x {meta['iters']} calls, "
          f"{meta['date']}")
    print()
    print(report['table'])
    print()
    print(report['ratio_table'])
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2)
        print(f'\nresults: {args.out}')


if __name__ == '__main__':
    main()
