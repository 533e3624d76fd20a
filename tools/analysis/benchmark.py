#!/usr/bin/env python
"""Speed of a distillation config's student, distillation step and teacher
cache, measured side by side in one run on this machine.

Examples::

    # CI size, seconds (tiny teachers: tools/misc/create_tiny_teachers.py)
    python tools/analysis/benchmark.py --memory none --config \\
        configs/distill/kiv_adapter-vit-t14-reg4_1xb4-20it_tiny-coco-images.py
    # the real recipe without its weight files, batch 4
    python tools/analysis/benchmark.py --random-weights --batch-size 4 \\
        --iters 3 --repeats 3 --config \\
        configs/distill/kiv_adapter-vit-b14-reg4_dinov2-clip-sam-maskrcnn_8xb64-100k_in1k.py

Every case is built from ``--config`` (a ``kiv.KnowledgeInheritance``
config, online or cached; ``--cfg-options`` first):

(a) ``timm_fwd`` / ``timm_train``: the student's base ViT
    (``model.student.base``) alone, forward (no grad) and full train step
    (every weight);
(b) ``adapter_fwd`` / ``adapter_train``: the student (``model.student``)
    ``forward_features``, and its train step (base frozen);
(c) ``teachers_fwd``: the teachers (``model.teachers``) on the batch;
    ``teachers_fused``: the same teachers with ``fuse_conv_bn=True`` and
    ``channels_last=True``; ``distill_online``: one train step of
    ``model``;
(d) ``distill_cached``: the same step from a teacher cache of the benchmark
    images: the cached config (``use_teacher_cache``, as
    ``tools/train.py``), ``kiv.CachedTeacher``, no teacher in memory;
(e) ``cache_write``: the cache writer of ``tools/cache_teachers.py`` over
    ``batch x iters`` images (teachers + fp16 shards + statistics + index);
(f) ``optim_config``: one optimizer step (clipping included) of the
    config's ``optim_wrapper`` (its constructor, ``paramwise_cfg`` and
    optimizer options, fp32: no AMP loss scaling) over the distiller's
    trainable weights, with fixed gradients; ``optim_default``: the same
    with mmengine's default constructor and the optimizer's single-tensor
    path (no ``fused`` / ``foreach``): one parameter group per parameter
    when ``paramwise_cfg`` is set.

What the benchmark sets itself: the images (``batch x iters`` synthetic
ones, through the config's train pipeline; data loading is not timed), the
batch size (``--batch-size``, default the config's), the train steps'
optimizer (``optim_wrapper.optimizer`` in fp32, no AMP, clipping or
paramwise options), no gradient-share diagnostics, one cached view per
image. ``--random-weights`` replaces every weights file the config names
by random weights of the same architecture, loaded through the real code
paths. Every case runs ``--iters`` calls per repeat, the cases take turns,
``--repeats`` times; the table gives the median img/s with its min-max,
counted GFLOP per image and achieved GFLOP/s, and the peak memory of the
case measured in a fresh process (``--memory``). See docs/performance.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import logging
import os
import os.path as osp
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from typing import Any, Callable, Optional

# mmengine 0.10 and mmcv import pkg_resources, which warns on every start.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

import kiv  # noqa: E402  (registers kiv.*)
from kiv.utils.benchmark import (BenchCase, CaseResult,  # noqa: E402
                                 RatioSpec, compute_ratio, count_flops,
                                 cpu_model,
                                 format_ratios, format_table,
                                 measure_interleaved, peak_rss_bytes,
                                 reset_peak_rss, rss_bytes, synchronize)

CASES = ('timm_fwd', 'timm_train', 'adapter_fwd', 'adapter_train',
         'teachers_fwd', 'teachers_fused', 'distill_online',
         'distill_cached', 'cache_write', 'optim_default', 'optim_config')
GROUPS = {'timm_fwd': '(a)', 'timm_train': '(a)', 'adapter_fwd': '(b)',
          'adapter_train': '(b)', 'teachers_fwd': '(c)',
          'teachers_fused': '(c)', 'distill_online': '(c)',
          'distill_cached': '(d)', 'cache_write': '(e)',
          'optim_default': '(f)', 'optim_config': '(f)'}
LABELS = {
    'timm_fwd': 'timm ViT forward',
    'timm_train': 'timm ViT train step (all weights)',
    'adapter_fwd': 'kiv.AdapterViT forward_features',
    'adapter_train': 'kiv.AdapterViT train step (base frozen)',
    'teachers_fwd': 'teachers forward',
    'teachers_fused': 'teachers forward, fuse_conv_bn + channels_last',
    'distill_online': 'distillation step, teachers online',
    'distill_cached': 'distillation step from the teacher cache',
    'cache_write': 'cache writing (teachers + shards + statistics)',
    'optim_default': "optimizer step, mmengine's default constructor",
    'optim_config': 'optimizer step as configured',
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
    RatioSpec('teachers fwd, fused + channels-last / as configured',
              ['teachers_fused'], ['teachers_fwd'], '<= 1'),
    RatioSpec("optimizer step as configured / mmengine's default groups",
              ['optim_config'], ['optim_default'], '<= 1'),
)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command line (``--memory-worker`` is internal)."""
    parser = argparse.ArgumentParser(
        description='Side-by-side speed of a distillation config: its '
        "student's base ViT, the student, the distillation step (online / "
        'from the cache) and cache writing',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--config', required=True,
                        help='a kiv distillation config (online or cached)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (e.g. '
        'model.student.with_cp=False)')
    parser.add_argument('--random-weights', action='store_true',
                        help='random weights of the same architectures for '
                        'every weights file the config names (student base, '
                        'teachers), written to the work dir')
    parser.add_argument('--batch-size', type=int,
                        help='images per step (default: the config\'s '
                        'train_dataloader.batch_size)')
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
                        help='where the prepared config, weights, images and '
                        'the cache go (default: a temporary directory, '
                        'removed after)')
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--quiet', action='store_true',
                        help='no progress lines')
    parser.add_argument('--memory-worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(',') if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f'unknown cases {unknown}; choose from {list(CASES)}')
    for name in ('batch_size', 'iters', 'repeats'):
        value = getattr(args, name)
        if value is not None and value < 1:
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


# ------------------------------------------------------------------- config
def _scope(cfg: Config) -> str:
    return cfg.get('default_scope', None) or 'kiv'


def weight_files(model: dict) -> list[tuple[str, dict]]:
    """Where a distillation model config names weights files.

    Args:
        model (dict): ``cfg.model`` of a ``kiv.KnowledgeInheritance``.

    Returns:
        list[tuple[str, dict]]: ``('student base' | 'teacher <name>', the
        dict whose ``checkpoint`` is the file)``: the student's base and
        every teacher source with a ``checkpoint``.
    """
    found = []
    base = model['student'].get('base')
    if isinstance(base, dict) and base.get('checkpoint'):
        found.append(('student base', base))
    for name, teacher in model['teachers'].items():
        source = teacher.get('source')
        if isinstance(source, dict) and source.get('checkpoint'):
            found.append((f'teacher {name}', source))
    return found


@contextlib.contextmanager
def _log_level(level: int):
    """Raise the current mmengine logger's level for a while."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


def random_state_dict(what: str, holder: dict, scope: str,
                      empty_file: str) -> dict:
    """Random weights of the network a weights file is loaded into.

    Args:
        what (str): ``'student base'`` or ``'teacher <name>'``.
        holder (dict): the base config or the teacher's source config.
        scope (str): the config's default scope.
        empty_file (str): an empty state dict file: a teacher source is
            built from it with ``strict=False``, i.e. with its own random
            initialisation.

    Returns:
        dict: the state dict, in the layout the source loads strictly.
    """
    from kiv.models.backbones import build_base_vit
    from kiv.registry import TEACHER_SOURCES
    with DefaultScope.overwrite_default_scope(scope):
        if what == 'student base':
            return build_base_vit(dict(holder, checkpoint=None)) \
                .model.state_dict()
        with _log_level(logging.ERROR):  # the expected missing-key warning
            return TEACHER_SOURCES.build(
                dict(holder, checkpoint=empty_file, strict=False)) \
                .state_dict()


class Workspace:
    """The benchmark's files: the prepared config (``config.json``) and what
    it names (weights, images, the teacher cache), with ``meta.json``.

    Args:
        root (str): the directory.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        # JSON keeps the order of the teachers (a .py dump sorts keys)
        self.config_file = osp.join(root, 'config.json')
        self.meta_file = osp.join(root, 'meta.json')
        self.image_dir = osp.join(root, 'images')
        self.weight_dir = osp.join(root, 'weights')
        self.cache_dir = osp.join(root, 'cache')
        self.cfg: Any = None
        self.meta: dict = {}
        self.cache_error: Optional[str] = None

    def load(self) -> Workspace:
        """Read a prepared workspace (memory workers)."""
        self.cfg = Config.fromfile(self.config_file)
        with open(self.meta_file) as f:
            self.meta = json.load(f)
        self.cache_error = self.meta.get('cache_error')
        return self

    @property
    def batch_size(self) -> int:
        return self.meta['batch_size']

    @property
    def num_images(self) -> int:
        return self.meta['num_images']

    def prepare(self, args: argparse.Namespace,
                log: Callable[[str], None]) -> None:
        """The benchmark's config from ``args.config``, and its files.

        Loads the config with ``--cfg-options``, takes a cached config's
        online config, points weights to random files (``--random-weights``;
        else every file must exist), replaces the train data by synthetic
        images through the config's train pipeline, turns the gradient-share
        diagnostics off, writes ``config.json`` and ``meta.json``, and the
        teacher cache of the images if ``distill_cached`` is measured.

        Raises:
            SystemExit: not a distillation config, or missing weights files
                without ``--random-weights``.
        """
        from kiv.datasets.teacher_cache.config import online_config
        os.makedirs(self.root, exist_ok=True)
        cfg = Config.fromfile(args.config)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
        model = cfg.get('model', None)
        if not isinstance(model, dict) or not model.get('student') or \
                not model.get('teachers'):
            raise SystemExit(f'{args.config}: not a distillation config '
                             '(a kiv.KnowledgeInheritance model with '
                             'student and teachers)')
        cfg = online_config(cfg)
        cfg.pop('teacher_cache', None)
        cfg.model.grad_share_interval = 0  # a periodic diagnostic
        random = self._weights(cfg, args.random_weights, log)
        loader = cfg.train_dataloader
        batch_size = args.batch_size or loader.batch_size
        pipeline = loader.dataset.get('pipeline', None)
        if not pipeline:
            raise SystemExit(f'{args.config}: train_dataloader.dataset has '
                             'no pipeline')
        cfg.train_dataloader = dict(
            batch_size=batch_size, num_workers=0, persistent_workers=False,
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='pseudo_collate'),
            dataset=dict(type='kiv.UnlabeledImageDataset',
                         data_root=self.image_dir, pipeline=pipeline))
        num_images = batch_size * args.iters
        size = self._write_images(cfg, num_images, args.seed)
        cfg.dump(self.config_file)
        self.cfg = Config.fromfile(self.config_file)  # what workers read
        self.meta = dict(config=args.config, cfg_options=args.cfg_options,
                         batch_size=batch_size, num_images=num_images,
                         input_size=size, random_weights=random)
        if 'distill_cached' in args.cases:
            log(f'writing the teacher cache of {num_images} images')
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            try:
                with _quiet_stdout():
                    self.new_writer(self.cache_dir, args).run(
                        check_space=False)
            except Exception as err:  # reported in the table, not hidden
                self.cache_error = ('the teacher cache could not be written '
                                    f'({type(err).__name__}: {err})')
                log(self.cache_error)
        self.meta['cache_error'] = self.cache_error
        with open(self.meta_file, 'w') as f:
            json.dump(self.meta, f, indent=2)

    def _weights(self, cfg: Config, random: bool,
                 log: Callable[[str], None]) -> list[str]:
        """Check the weights files, or point them to random ones.

        One random file per original file (the student base and the base
        teacher share theirs, as in the recipe), named by the original path
        and the architecture it was made for.

        Returns:
            list[str]: what got random weights (``'student base'``,
            ``'teacher <name>'``).
        """
        found = weight_files(cfg.model)
        if not random:
            missing = [f'{what}: {holder["checkpoint"]}'
                       for what, holder in found if not osp.isfile(
                           osp.expanduser(holder['checkpoint']))]
            if missing:
                raise SystemExit(
                    'weights files not found (' + '; '.join(missing) +
                    '); pass --random-weights to benchmark random weights '
                    'of the same architectures')
            return []
        os.makedirs(self.weight_dir, exist_ok=True)
        empty = osp.join(self.weight_dir, 'empty.pth')
        torch.save({}, empty)
        torch.manual_seed(0)
        files: dict[str, str] = {}
        for what, holder in found:
            original = holder['checkpoint']
            if original not in files:
                key = json.dumps([original, holder.to_dict()],
                                 sort_keys=True, default=str)
                stem = osp.splitext(osp.basename(original))[0]
                files[original] = osp.join(
                    self.weight_dir, f'{stem}-'
                    f'{hashlib.sha1(key.encode()).hexdigest()[:10]}.pth')
                if not osp.isfile(files[original]):
                    log(f'random weights for {what} ({original})')
                    torch.save(random_state_dict(what, holder, _scope(cfg),
                                                 empty), files[original])
            holder['checkpoint'] = files[original]
        return [what for what, _ in found]

    def _write_images(self, cfg: Config, count: int,
                      seed: int) -> list[int]:
        """``count`` smooth random RGB images (PNG) at the size the train
        pipeline gives (found with a probe image).

        Returns:
            list[int]: ``[H, W]`` of the student's input images.
        """
        import cv2
        shutil.rmtree(self.image_dir, ignore_errors=True)
        os.makedirs(self.image_dir)
        rng = np.random.default_rng(seed)

        def write(index: int, size: tuple[int, int]) -> None:
            h, w = size
            small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3),
                                 dtype=np.uint8)
            cv2.imwrite(osp.join(self.image_dir, f'{index:05d}.png'),
                        cv2.resize(small, (w, h),
                                   interpolation=cv2.INTER_CUBIC))

        write(0, (64, 64))
        size = self._first_sample(cfg)['inputs'].shape[-2:]
        for i in range(count):
            write(i, size)
        return [int(s) for s in self._first_sample(cfg)['inputs'].shape[-2:]]

    @staticmethod
    def _first_sample(cfg: Config) -> dict:
        from kiv.registry import DATASETS
        with DefaultScope.overwrite_default_scope(_scope(cfg)):
            return DATASETS.build(copy.deepcopy(
                cfg.train_dataloader.dataset))[0]

    def new_writer(self, out_dir: str, args: argparse.Namespace) -> Any:
        """A prepared (teachers built, outputs measured) cache writer of
        ``tools/cache_teachers.py`` (one view per image, fp16).

        Args:
            out_dir (str): the cache directory to write.
            args (argparse.Namespace): benchmark options.

        Returns:
            TeacherCacheWriter: ready to ``run``.
        """
        from kiv.datasets.teacher_cache import TeacherCacheWriter
        writer = TeacherCacheWriter(
            self.cfg, out_dir, views=1, dtype='fp16', seed=args.seed,
            num_workers=0, device=args.device, config_path=self.config_file,
            log=lambda msg: None)
        writer.prepare()
        return writer


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
    if hasattr(outputs, 'features'):  # a FeatureOutput: every summary
        summaries = list((outputs.summaries or {}).values()) or \
            [outputs.summary]
        tensors = summaries + list(outputs.features)
    else:
        tensors = list(outputs)
    return sum(t.float().pow(2).mean() for t in tensors if t is not None)


class CaseBuilder:
    """Builds the benchmark cases from the workspace's config, sharing
    models where timing allows.

    Args:
        ws (Workspace): the prepared workspace.
        args (argparse.Namespace): benchmark options.
    """

    def __init__(self, ws: Workspace, args: argparse.Namespace) -> None:
        self.ws = ws
        self.cfg = ws.cfg
        self.args = args
        self.device = torch.device(args.device)
        self.shared: dict[str, Any] = {}
        gen = torch.Generator().manual_seed(args.seed)
        self.images = torch.randn(ws.batch_size, 3, *ws.meta['input_size'],
                                  generator=gen).to(self.device)

    def build(self, name: str) -> BenchCase:
        """The case ``name`` (unavailable cases carry the reason).

        Args:
            name (str): one of :data:`CASES`.

        Returns:
            BenchCase: ready to time.
        """
        case = BenchCase(name, LABELS[name], self.ws.batch_size,
                         calls=self.args.iters, group=GROUPS[name])
        getattr(self, f'_{name}')(case)
        return case

    def _build(self, registry: Any, cfg: dict) -> Any:
        with DefaultScope.overwrite_default_scope(_scope(self.cfg)):
            return registry.build(copy.deepcopy(cfg))

    def _optimizer(self, module: torch.nn.Module) -> torch.optim.Optimizer:
        """The config's ``optim_wrapper.optimizer`` over the trainable
        weights."""
        from kiv.registry import OPTIMIZERS
        return self._build(OPTIMIZERS, dict(
            self.cfg.optim_wrapper.optimizer,
            params=[p for p in module.parameters() if p.requires_grad]))

    # (a) ---------------------------------------------------------------
    def _timm(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        if 'timm' not in self.shared:
            from kiv.models.backbones import build_base_vit
            with DefaultScope.overwrite_default_scope(_scope(self.cfg)):
                model = build_base_vit(self.cfg.model.student.base).model
            model.to(self.device)
            self.shared['timm'] = (model, self._optimizer(model))
        return self.shared['timm']

    def _timm_fwd(self, case: BenchCase) -> None:
        case.step = self._forward_step(self._timm()[0])

    def _timm_train(self, case: BenchCase) -> None:
        case.step = self._train_step(*self._timm())

    # (b) ---------------------------------------------------------------
    def _adapter(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        if 'adapter' not in self.shared:
            from kiv.registry import MODELS
            model = self._build(MODELS, self.cfg.model.student)
            model.to(self.device)
            self.shared['adapter'] = (model, self._optimizer(model))
        return self.shared['adapter']

    def _adapter_fwd(self, case: BenchCase) -> None:
        case.step = self._forward_step(self._adapter()[0])

    def _adapter_train(self, case: BenchCase) -> None:
        case.step = self._train_step(*self._adapter())

    def _forward_step(self, model: torch.nn.Module) -> Callable[[], None]:
        """One inference ``forward_features`` of the benchmark batch."""
        forward = getattr(model, 'forward_features', model)

        def step() -> None:
            model.eval()
            with torch.no_grad():
                forward(self.images)

        return step

    def _train_step(self, model: torch.nn.Module,
                    optim: torch.optim.Optimizer) -> Callable[[], None]:
        """One training step of ``forward_features`` (forward, backward,
        optimizer step) on the benchmark batch."""
        forward = getattr(model, 'forward_features', model)

        def step() -> None:
            model.train()
            _loss(forward(self.images)).backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

        return step

    # (c) ---------------------------------------------------------------
    def _distiller(self, cfg: Config) -> tuple[Any, Any]:
        """The distiller of ``cfg`` with the config's optimizer."""
        from mmengine.optim import OptimWrapper

        from kiv.registry import MODELS
        model = self._build(MODELS, cfg.model).to(self.device).train()
        return model, OptimWrapper(self._optimizer(model))

    def _batch(self, dataset_cfg: dict) -> dict:
        """The first ``batch_size`` samples of a dataset, collated."""
        from mmengine.dataset import pseudo_collate

        from kiv.registry import DATASETS
        dataset = self._build(DATASETS, dataset_cfg)
        return pseudo_collate(
            [dataset[i] for i in range(self.ws.batch_size)])

    def _online(self) -> tuple[Any, Any, dict]:
        if 'online' not in self.shared:
            model, wrapper = self._distiller(self.cfg)
            data = self._batch(self.cfg.train_dataloader.dataset)
            # fixed statistics, as after the warm-up of a real run
            inputs = model.data_preprocessor(data, False)
            model.load_statistics(model.statistic_sums(
                inputs['inputs'], inputs['data_samples']))
            self.shared['online'] = (model, wrapper, data)
        return self.shared['online']

    def _teachers_alone(self, **options: Any) -> tuple[Any, torch.Tensor]:
        """The config's teachers (with ``options`` added to each
        ``kiv.Teacher`` config) and the preprocessed benchmark batch, with
        no student in memory."""
        from kiv.registry import MODELS
        teachers = torch.nn.ModuleDict({
            name: self._build(MODELS, dict(t, **options))
            for name, t in self.cfg.model.teachers.items()
        }).to(self.device)
        # the model's data preprocessor (kiv.KnowledgeInheritance's
        # default if the config sets none)
        preprocess = self._build(MODELS, self.cfg.model.get(
            'data_preprocessor', None) or dict(
                type='mmengine.ImgDataPreprocessor', bgr_to_rgb=True))
        preprocess.to(self.device)
        data = self._batch(self.cfg.train_dataloader.dataset)
        return teachers, preprocess(data, False)['inputs']

    @staticmethod
    def _teachers_label(case: BenchCase, teachers: Any) -> str:
        """The case's label with the teachers' names and the BatchNorm
        layers left in them (a fused teacher has none to run)."""
        norms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                    for t in teachers.values() for m in t.modules())
        return f'{case.label} ({", ".join(teachers)}; {norms} BatchNorms)'

    @staticmethod
    def _teachers_step(teachers: Any, images: torch.Tensor
                       ) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                for teacher in teachers.values():
                    teacher(images)

        return step

    def _teachers_fwd(self, case: BenchCase) -> None:
        if 'online' in self.shared:
            model, _, data = self.shared['online']
            teachers = model.teachers
            images = model.data_preprocessor(data, False)['inputs']
        else:  # alone (memory worker): only the teachers in memory
            teachers, images = self._teachers_alone()
        case.label = self._teachers_label(case, teachers)
        case.step = self._teachers_step(teachers, images)

    def _teachers_fused(self, case: BenchCase) -> None:
        """The config's teachers built with ``fuse_conv_bn=True`` and
        ``channels_last=True`` (``kiv.Teacher`` options; a teacher without
        BatchNorms only changes memory format), on the same batch."""
        teachers, images = self._teachers_alone(fuse_conv_bn=True,
                                                channels_last=True)
        case.label = self._teachers_label(case, teachers)
        case.step = self._teachers_step(teachers, images)

    def _distill_online(self, case: BenchCase) -> None:
        model, wrapper, data = self._online()
        case.step = lambda: model.train_step(data, wrapper)

    # (d) ---------------------------------------------------------------
    def _distill_cached(self, case: BenchCase) -> None:
        from kiv.datasets.teacher_cache import use_teacher_cache
        if self.ws.cache_error:
            case.unavailable = self.ws.cache_error
            return
        if not osp.isfile(osp.join(self.ws.cache_dir, 'index.json')):
            case.unavailable = f'no teacher cache in {self.ws.cache_dir}'
            return
        # the cached config, as tools/train.py makes it (statistics fixed
        # from the cache when the model is built)
        cfg = use_teacher_cache(copy.deepcopy(self.cfg), self.ws.cache_dir)
        model, wrapper = self._distiller(cfg)
        data = self._batch(cfg.train_dataloader.dataset)
        case.step = lambda: model.train_step(data, wrapper)

    # (e) ---------------------------------------------------------------
    def _cache_write(self, case: BenchCase) -> None:
        state: dict[str, Any] = {}
        case.images = self.ws.num_images
        case.calls = 1

        def before_call() -> None:
            state.pop('writer', None)
            out = osp.join(self.ws.root, 'cache_write')
            shutil.rmtree(out, ignore_errors=True)
            state['writer'] = self.ws.new_writer(out, self.args)

        def step() -> None:
            with _quiet_stdout():
                state['writer'].run(check_space=False)

        case.before_call = before_call
        case.step = step

    # (f) ---------------------------------------------------------------
    def _trainable_model(self) -> torch.nn.Module:
        """The config's distiller (shared with ``distill_online``)."""
        if 'online' in self.shared:
            return self.shared['online'][0]
        if 'trainable' not in self.shared:
            from kiv.registry import MODELS
            self.shared['trainable'] = self._build(
                MODELS, self.cfg.model).to(self.device)
        return self.shared['trainable']

    def _optim_step(self, case: BenchCase, wrapper_cfg: dict,
                    what: str) -> None:
        """Time ``wrapper.step()`` + ``zero_grad()`` of ``wrapper_cfg``
        on the distiller's trainable weights; every call starts from the
        same seeded gradients (set untimed)."""
        from mmengine.optim import build_optim_wrapper
        model = self._trainable_model()
        # mmengine warns once per frozen parameter under paramwise_cfg
        with DefaultScope.overwrite_default_scope(_scope(self.cfg)), \
                _log_level(logging.ERROR):
            wrapper = build_optim_wrapper(model, copy.deepcopy(wrapper_cfg))
        groups = wrapper.optimizer.param_groups
        params = [p for g in groups for p in g['params']]
        gen = torch.Generator().manual_seed(self.args.seed)
        grads = [1e-3 * torch.randn(p.shape, generator=gen).to(p)
                 for p in params]
        case.label = (f'{case.label} ({what}; {len(params)} tensors in '
                      f'{len(groups)} groups)')

        def before_call() -> None:
            for p, g in zip(params, grads):
                p.grad = g.clone()  # clipping scales them in place

        def step() -> None:
            wrapper.step()
            wrapper.zero_grad()

        case.before_call = before_call
        case.step = step

    def _optim_wrapper_cfg(self) -> dict:
        """The config's ``optim_wrapper`` as a plain fp32
        ``OptimWrapper`` (AMP needs a GPU; its loss scaling is not what
        is compared)."""
        src = self.cfg.optim_wrapper
        return dict({k: copy.deepcopy(src[k]) for k in
                     ('optimizer', 'clip_grad', 'paramwise_cfg',
                      'constructor') if src.get(k) is not None},
                    type='OptimWrapper')

    def _optim_default(self, case: BenchCase) -> None:
        cfg = self._optim_wrapper_cfg()
        cfg.pop('constructor', None)
        cfg['optimizer'] = {k: v for k, v in cfg['optimizer'].items()
                            if k not in ('fused', 'foreach')}
        self._optim_step(case, cfg, 'mmengine.DefaultOptimWrapper'
                         'Constructor, single-tensor')

    def _optim_config(self, case: BenchCase) -> None:
        cfg = self._optim_wrapper_cfg()
        options = [k for k in ('fused', 'foreach')
                   if cfg['optimizer'].get(k)]
        self._optim_step(case, cfg, ', '.join(
            [cfg.get('constructor', 'mmengine default constructor')] +
            options))


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

    Builds the case from the prepared workspace, runs one warm-up call and
    one measured call; prints ``{"case": ..., "peak_bytes": ...}``:
    ``torch.cuda.max_memory_allocated`` on a GPU, else the growth of the
    peak RSS over the process after imports (weights, activations,
    optimizer state, allocator caches; the peak restarts after the
    imports).
    """
    _set_threads(args)
    _quiet_mmengine()
    _initialise_kernels(args.device)
    reset_peak_rss()
    baseline = rss_bytes()
    cuda = args.memory == 'cuda'
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    ws = Workspace(args.work_dir).load()
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


def measure_memory(args: argparse.Namespace, ws: Workspace,
                   log: Callable[[str], None]) -> dict[str, Optional[int]]:
    """Run one memory worker per case on the prepared workspace.

    Returns:
        dict[str, int | None]: case -> peak bytes (None if it failed).
    """
    forwarded = ['--config', ws.config_file, '--work-dir', ws.root,
                 '--iters', str(args.iters), '--device', args.device,
                 '--memory', args.memory, '--seed', str(args.seed)]
    if args.threads:
        forwarded += ['--threads', str(args.threads)]
    peaks: dict[str, Optional[int]] = {}
    for name in args.cases:
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
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds'),
        host=platform.node(), python=platform.python_version(),
        torch=torch.__version__, kiv=getattr(kiv, '__version__', None),
        cpu=cpu_model(), cpu_count=os.cpu_count(),
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
        dict: ``meta`` (machine, options, what the config gave), ``cases``
        and ``ratios``.
    """
    log = _log(args)
    _quiet_mmengine()
    _set_threads(args)
    torch.manual_seed(args.seed)
    created = args.work_dir is None
    work_dir = args.work_dir or tempfile.mkdtemp(prefix='kiv-benchmark-')
    try:
        ws = Workspace(work_dir)
        ws.prepare(args, log)
        peaks = measure_memory(args, ws, log) \
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
    meta = dict(machine_info(args), **{
        k: v for k, v in ws.meta.items() if k != 'cache_error'
    }, iters=args.iters, warmup=args.warmup, repeats=args.repeats,
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
    height, width = meta['input_size']
    print(f"kiv benchmark: {osp.basename(meta['config'])}, batch "
          f"{meta['batch_size']}, {height}x{width} px, {meta['device']} "
          f"({meta['cpu']}, {meta['threads']} threads), {meta['clock']} "
          f"clock, {meta['repeats']} repeats x {meta['iters']} calls, "
          f"{meta['date']}")
    if meta['random_weights']:
        print('random weights: ' + ', '.join(meta['random_weights']))
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
