"""The demo's recipes: its configs as each stage runs them (schedules,
the teacher-feature cache, ablation variants, probe inputs) and the
mmengine ``Runner`` call every training stage goes through.

The stages themselves are in :mod:`kiv_demo.train_stages` and
:mod:`kiv_demo.eval_stages`; :mod:`kiv_demo.pipeline` assembles them.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import json
import os
import os.path as osp

import torch
from mmengine.config import Config, ConfigDict

from kiv.apis.launch import add_nonfinite_loss_hook
from kiv.utils.atomic import atomic_torch_save

from .stages import ProgressHook, StageContext

__all__ = ['PROJECT', 'REPO', 'CONFIG_DIR', 'CONFIGS', 'CACHE', 'KB_CACHE',
           'CACHED_TEACHERS', 'ROWS', 'VARIANTS', 'CLASSES', 'RIVAL_SPLITS',
           'load_cfg',
           'run_runner', 'use_cache', 'knowledge_base_cfg', 'cache_cfg',
           'inherit_cfg', 'rival_cfg', 'DENSE_TEACHER', 'dense_space',
           'probe_backbone_cfg', 'probe_cfg',
           'keep_test_outputs', 'interval_table', 'effnet_teacher']

#: the demo's project folder (``projects/kiv_demo`` of the kiv checkout:
#: the demo runs from the checkout, whatever kiv install it imports)
PROJECT = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: the kiv checkout (its ``configs/_base_`` holds the runtime the demo's
#: configs inherit)
REPO = osp.dirname(osp.dirname(PROJECT))
CONFIG_DIR = osp.join(PROJECT, 'configs')
CONFIGS = dict(
    teacher_det='teacher_mask-rcnn_effnet-lite0_fpn_world.py',
    teacher_seg='teacher_fpn_effnet-lite0_world-seg.py',
    knowledge_base='kiv_plain-vit-s8-reg4_effnet-lite0_world-photos.py',
    inherit='kiv_adapter-vit-s8-reg4_kb-effnet-det-seg_world-photos.py',
    rival='rival_adapter-vit_scratch_world-multitask.py',
    probe_det='probe_mask-rcnn_world.py',
    probe_seg='probe_fpn_world-seg.py',
)
#: the inheritance run's teacher-feature cache (written after the
#: knowledge base is made: every teacher of the run, the knowledge base
#: included, is read from it)
CACHE = 'teacher_cache'
CACHED_TEACHERS = ('kb', 'effnet', 'det', 'seg')
#: the knowledge base's own distillation cache (EfficientNet-Lite0 only)
KB_CACHE = 'kb_cache'

#: table rows: stage holding ``student.pth`` -> label.
ROWS: dict[str, str] = {
    'inherit': 'inherited student (kiv)',
    'rival_user': 'data-centric on the user\'s data: same arch. from '
                  'scratch, multi-task on the user\'s labelled split',
    'rival_teachers': 'data-centric on the teachers\' labels: same arch. '
                      'from scratch, multi-task on the teachers\' split',
    'kb_alone': 'knowledge base alone (its own maps: adapter gates '
                'closed)',
    'inherit_nolatent': 'ablation: no shared latent space (raw targets)',
    'inherit_cosine': 'ablation: cosine-only losses',
    'inherit_nokb': 'ablation: no knowledge base (random ViT, trained)',
    'inherit_nozero': 'ablation: injectors not zero-initialised',
    'inherit_nomt': 'ablation: no multi-task heads',
    'check_strong': 'probe check, strong: the detection teacher\'s own '
                    'backbone + FPN',
    'check_weak': 'probe check, weak: the same architecture, random '
                  'weights',
}
#: inheritance runs: the method and, with ``--full``, its ablations.
VARIANTS = ('inherit', 'inherit_nolatent', 'inherit_cosine', 'inherit_nokb',
            'inherit_nozero', 'inherit_nomt')
CLASSES = ('disc', 'square', 'triangle', 'star', 'ring', 'cross')
#: the labelled split each data-centric row trains on (world COCO split)
RIVAL_SPLITS = {'rival_user': 'train', 'rival_teachers': 'teachers'}


_run_counter = 0


def _config_files(*names: str) -> list[str]:
    """Demo configs and their local ``_base_`` files (fingerprinted)."""
    files = [osp.join(CONFIG_DIR, n) for n in names]
    files += sorted(glob.glob(osp.join(CONFIG_DIR, '_base_', '*.py')))
    files.append(osp.join(REPO, 'configs', '_base_', 'default_runtime.py'))
    return files


def load_cfg(key: str) -> Config:
    """Load the demo config of stage kind ``key``."""
    return Config.fromfile(osp.join(CONFIG_DIR, CONFIGS[key]))


def _set_schedule(cfg: Config, iters: int, batch: int,
                  lr: float | None = None) -> None:
    """Set iterations, batch size (and lr); stretch the schedulers."""
    cfg.train_cfg.max_iters = iters
    cfg.train_dataloader.batch_size = batch
    if lr is not None:
        cfg.optim_wrapper.optimizer.lr = lr
    warmup = max(1, min(30, iters // 10))
    for sched in cfg.get('param_scheduler', None) or []:
        if sched['type'] == 'LinearLR':
            sched['end'] = warmup
        else:
            sched['begin'] = warmup
            sched['end'] = max(iters, warmup + 1)
    logger = cfg.default_hooks.get('logger')
    if logger is not None:  # at least ~10 points per curve
        logger['interval'] = min(logger.get('interval', 10),
                                 max(1, iters // 10))
    if 'log_processor' in cfg:
        cfg.log_processor['window_size'] = min(
            cfg.log_processor.get('window_size', 10), max(1, iters // 10))
    ckpt = cfg.default_hooks.get('checkpoint')
    if ckpt is not None and cfg.get('default_scope') == 'kiv':
        ckpt['interval'] = iters


def run_runner(cfg: Config, ctx: StageContext, train: bool = True,
               test: bool = True, share: float = 0.85):
    """Train and/or test ``cfg`` with mmengine's Runner in the stage dir.

    Logs, ``vis_data/scalars.json`` and checkpoints go to ``ctx.dir``; the
    console shows only warnings and the demo's progress lines.

    Returns:
        tuple: ``(runner, test metrics or {})``.
    """
    from mmengine.runner import Runner
    global _run_counter
    _run_counter += 1
    # the Runner renders the config as text several times (its log, the
    # dumped copy, the visualizer's); mmengine formats that text with yapf,
    # 0.2-0.8 s a time for the demo's configs, once per stage on two cores
    # of CPU-seconds: the demo keeps mmengine's unformatted text
    cfg = Config(cfg.to_dict(), cfg_text=cfg.text, filename=cfg.filename,
                 env_variables=cfg.env_variables, format_python_code=False)
    cfg.work_dir = ctx.dir
    cfg.experiment_name = f'{ctx.stage.name}_{os.getpid()}_{_run_counter}'
    add_nonfinite_loss_hook(cfg)  # a NaN/Inf loss never reaches weights
    cfg.log_level = 'WARNING'
    cfg.randomness = dict(seed=ctx.seed, deterministic=True)
    cfg.launcher = 'none'
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        if cfg.get(key) is not None:
            cfg[key].num_workers = 0
            cfg[key].persistent_workers = False
    if not train:
        cfg.train_dataloader = cfg.train_cfg = cfg.optim_wrapper = None
        cfg.param_scheduler = None
    # mmengine's IterBasedTrainLoop validates after its last iteration
    # whatever ``val_interval`` says; the stage's numbers come from
    # ``runner.test()`` on the same scenes, so that pass would be done twice
    dropped = ('val_dataloader', 'val_cfg', 'val_evaluator')
    if not test:
        dropped += ('test_dataloader', 'test_cfg', 'test_evaluator')
    for key in dropped:
        cfg[key] = None
    # pycocotools and the toolboxes print to stdout: keep that in the log
    with open(osp.join(ctx.dir, 'stdout.log'), 'a', encoding='utf-8') as log, \
            contextlib.redirect_stdout(log):
        runner = Runner.from_cfg(cfg)
        runner.register_hook(
            ProgressHook(ctx.progress, share=share if test else 1.0),
            priority='VERY_LOW')
        if train:
            runner.train()
        metrics = runner.test() if test else {}
    return runner, {k: float(v) for k, v in (metrics or {}).items()}


def _save_weights(state_dict: dict, path: str,
                  meta: dict | None = None) -> None:
    """Save tensors only (loads with ``weights_only=True``): a bare state
    dict (``meta=None``, what timm's checkpoint filters expect), else
    ``{'state_dict', 'meta'}`` with ``meta`` made plain JSON data."""
    weights = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    obj = weights if meta is None else dict(
        state_dict=weights, meta=json.loads(json.dumps(meta, default=str)))
    atomic_torch_save(obj, path)


def _copy_scalars(ctx: StageContext) -> None:
    """Copy the run's ``vis_data/scalars.json`` to ``<stage>/scalars.json``.
    """
    found = sorted(glob.glob(osp.join(ctx.dir, '*', 'vis_data',
                                      'scalars.json')))
    if found:
        with open(found[-1], encoding='utf-8') as f:
            text = f.read()
        with open(osp.join(ctx.dir, 'scalars.json'), 'w',
                  encoding='utf-8') as f:
            f.write(text)


def _last_checkpoint(ctx_dir: str, iters: int) -> str:
    path = osp.join(ctx_dir, f'iter_{iters}.pth')
    if not osp.isfile(path):
        raise FileNotFoundError(f'demo stage {ctx_dir}: the run did not '
                                f'write {path}')
    return path


def _effnet_size(cfg: Config, size: int) -> None:
    if 'effnet' in cfg.model.teachers:
        cfg.model.teachers.effnet.input_size = size


def _task_models(cfg: Config) -> dict[str, dict]:
    """``TaskHead`` configs of a config's ``task_models`` (file names are
    demo probe configs whose ``model`` is used, with a scoped type)."""
    heads = {}
    for task, spec in cfg.task_models.items():
        if isinstance(spec, str):
            probe = Config.fromfile(osp.join(CONFIG_DIR, spec))
            model = probe.model.to_dict()
            model['type'] = f'{probe.default_scope}.{model["type"]}'
        else:
            model = copy.deepcopy(spec.to_dict() if isinstance(
                spec, ConfigDict) else dict(spec))
        heads[task] = dict(type='kiv_demo.TaskHead', task=task, model=model)
    return heads


def use_cache(cfg: Config, cache_dir: str, cached: tuple[str, ...],
              labels: bool, labelled_per_batch: int = 0) -> None:
    """Train ``cfg`` from the teacher-feature cache, in place.

    The ``cached`` teachers become ``kiv.CachedTeacher`` (kiv's
    ``cached_teachers``: their configs checked against the cache's; those
    distilled through their head as well keep it); the others stay online
    (the
    distiller runs them on the replayed views). The training set becomes
    ``kiv.TeacherCacheDataset`` over every cached view (loader + the
    cache's ``kiv.ReplayView``, then the world's labels for that view if
    ``labels``, then the packer). The config's ``kiv.StatisticsWarmupHook``
    then fixes every standardiser: to the cache's exact statistics when
    every teacher is read from it, else from one pass over those views.

    Args:
        cfg (Config): a ``kiv.KnowledgeInheritance`` config.
        cache_dir (str): the cache.
        cached (tuple[str, ...]): teachers to read from it.
        labels (bool): attach the world's labels (multi-task heads).
        labelled_per_batch (int): if > 0, every batch holds this many
            views of labelled images (``kiv_demo.LabelledShareSampler``).
    """
    from kiv.datasets.teacher_cache import read_index
    from kiv.models.distillers import KnowledgeInheritance
    from kiv.models.distillers.teacher_cache import cached_teachers
    index = read_index(cache_dir)
    logit_teachers = KnowledgeInheritance.logit_teachers(
        cfg.model.teachers, cfg.model.get('losses'),
        cfg.model.get('teacher_losses'))
    # the statistics are checked where they are loaded (the warm-up hook)
    stand_ins = cached_teachers(
        {name: cfg.model.teachers[name] for name in cached}, cache_dir,
        standardize=None,
        keep_heads=[n for n in logit_teachers if n in cached])
    for name, stand_in in stand_ins.items():  # replaced, not merged
        cfg.model.teachers[name] = stand_in
    pipeline = [index['loader'], index['view']]
    if labels:
        pipeline += [dict(type='kiv_demo.WorldViewLabels'),
                     dict(type='kiv_demo.PackWorldInputs')]
    else:
        pipeline.append(index['pack'])
    cfg.train_dataloader.dataset = dict(
        type='kiv.TeacherCacheDataset', cache_dir=cache_dir,
        teachers=list(cached), img_root=index['images']['root'],
        pipeline=pipeline)
    if labelled_per_batch:
        cfg.train_dataloader.sampler = dict(
            type='kiv_demo.LabelledShareSampler',
            batch_size=cfg.train_dataloader.batch_size,
            labelled_per_batch=labelled_per_batch)
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator',
                'test_dataloader', 'test_cfg', 'test_evaluator'):
        cfg[key] = None


def knowledge_base_cfg(preset: dict) -> Config:
    """The knowledge-base distillation config (online teachers)."""
    cfg = load_cfg('knowledge_base')
    p = preset['knowledge_base']
    _set_schedule(cfg, p['iters'], p['batch'], p.get('lr'))
    _effnet_size(cfg, preset['effnet_size'])
    return cfg


def cache_cfg(preset: dict, cache: str = CACHE) -> Config:
    """What a cache is written from.

    Args:
        preset (dict): the run's sizes.
        cache (str): :data:`KB_CACHE` (the knowledge-base config: its
            EfficientNet-Lite0 teacher on its views) or :data:`CACHE` (the
            inheritance config's teachers, :data:`CACHED_TEACHERS`, on the
            same images and views).

    Returns:
        Config: a distillation config (its student needs no file).
    """
    cfg = knowledge_base_cfg(preset)
    if cache == KB_CACHE:
        return cfg
    inherit = inherit_cfg('inherit', preset)
    cfg.model.teachers = {n: inherit.model.teachers[n]
                          for n in CACHED_TEACHERS}
    cfg.model.latent.teachers = {
        n: inherit.model.latent.teachers.get(n, {})
        for n in CACHED_TEACHERS}
    return cfg


def inherit_cfg(variant: str, preset: dict) -> Config:
    """The inheritance config of a variant (online teachers).

    Args:
        variant (str): ``'inherit'`` (the method) or an ablation of
            :data:`VARIANTS`.
        preset (dict): the run's sizes.

    Returns:
        Config: with ``model.task_heads`` built from ``task_models``
        (except ``inherit_nomt``).
    """
    if variant not in VARIANTS:
        raise ValueError(f'unknown inheritance variant {variant!r}; '
                         f'choose from {VARIANTS}')
    cfg = load_cfg('inherit')
    p = preset['inherit']
    _set_schedule(cfg, p['iters'], p['batch'], p.get('lr'))
    _effnet_size(cfg, preset['effnet_size'])
    # 6 points on the gradient-share curve: each costs one backward pass
    # per teacher, four steps' time on the critical path
    cfg.model.grad_share_interval = max(1, p['iters'] // 6)
    model = cfg.model
    if variant != 'inherit_nomt':
        model.task_heads = {
            task: dict(head=head, inputs=('summary' if task == 'cls'
                                          else 'pyramid'),
                       gt_field={'cls': 'gt_label', 'det': 'gt_instances',
                                 'seg': 'gt_sem_seg'}[task])
            for task, head in _task_models(cfg).items()}
    if variant == 'inherit_nolatent':
        model.latent.standardize = 'none'
    elif variant == 'inherit_cosine':
        cosine = dict(type='kiv.FeatureMatchingLoss', cosine_weight=1.0,
                      mse_weight=0.0)
        model.losses = dict(summary=cosine, features=cosine)
    elif variant == 'inherit_nokb':
        model.teachers.pop('kb')
        model.student.summary_names = [
            n for n in model.student.summary_names if n != 'kb']
        model.base_teacher = None
        model.student.base.checkpoint = None
        model.student.freeze_base = False
    elif variant == 'inherit_nozero':
        # the injectors' gates (the pyramid's start at 1 in every row)
        model.student.init_values = 1.0
    return cfg


#: the teacher whose space an inherited student gives its dense maps in
#: downstream (``kiv.InheritedBackbone``): the detector's FPN. First
#: measured on a default run's validation scenes, then checked on a world
#: of its own before adoption (seed 1000, ``--quick`` student, the default
#: seg probe: mIoU 24.5 on the student's pyramid, 30.3 on its maps in the
#: detector's space; docs/demo.md, "Probes")
DENSE_TEACHER = 'det'


def dense_space(row: str) -> str:
    """What a table row's det / seg probes read: ``'student'`` (the
    backbone's own pyramid) or, for an inheritance run (a :data:`VARIANTS`
    row), the :data:`DENSE_TEACHER`."""
    return DENSE_TEACHER if row in VARIANTS else 'student'


def probe_backbone_cfg(row: str, space: str | None = None) -> dict:
    """The frozen backbone of a table row, loaded from ``<row>/student.pth``.

    The architecture is the one the row was trained with, as recorded in the
    file's ``meta['student']`` (rows differ: e.g. a summary per teacher for
    the inherited student, one global token for the rivals). An inheritance
    run's student gives its maps in the :data:`DENSE_TEACHER`'s space
    (``kiv.InheritedBackbone``: student -> s2t heads -> inverse
    standardisation, from the heads exported with it), its summary as is.

    Args:
        row (str): the run's stage name (its ``student.pth``).
        space (str, optional): ``'student'`` or a teacher's name; defaults
            to :func:`dense_space` of ``row`` (a sweep's runs give the
            space of the row they tune).
    """
    from kiv.utils.checkpoint import safe_torch_load
    path = f'{row}/student.pth'
    meta = safe_torch_load(path, map_location='cpu').get('meta') or {}
    if not isinstance(meta.get('student'), dict):
        raise KeyError(f'{path}: no meta["student"] backbone config')
    student = copy.deepcopy(meta['student'])
    student['base']['checkpoint'] = None
    student.update(freeze_base=True, frozen_stages=5, out_type='both',
                   init_cfg=dict(type='Pretrained',
                                 checkpoint=f'{row}/student.pth'))
    space = dense_space(row) if space is None else space
    if space == 'student':
        return student
    levels = load_cfg('inherit').model.latent.teachers[space].student_levels
    return dict(type='kiv.InheritedBackbone', backbone=student,
                checkpoint=f'{row}/student.pth', teacher=space,
                student_levels=list(levels))


def rival_cfg(row: str, preset: dict) -> Config:
    """A data-centric row's config with its task heads.

    The student's architecture from random weights, trained multi-task on
    the labelled split of :data:`RIVAL_SPLITS` with the inheritance run's
    optimizer steps and its labelled views per step (the inherited student
    sees ``preset['inherit']['labelled']`` labelled views per step too, next
    to its unlabelled ones).

    Args:
        row (str): ``'rival_user'`` or ``'rival_teachers'``.
        preset (dict): the run's sizes.
    """
    if row not in RIVAL_SPLITS:
        raise ValueError(f'unknown data-centric row {row!r}; choose from '
                         f'{sorted(RIVAL_SPLITS)}')
    cfg = load_cfg('rival')
    p = preset['inherit']  # same optimizer steps, same labelled views
    _set_schedule(cfg, p['iters'], p['labelled'],
                  preset.get('rival', {}).get('lr'))
    split = RIVAL_SPLITS[row]
    cfg.train_dataloader.dataset.ann_file = \
        f'coco/annotations/instances_{split}2017.json'
    cfg.train_dataloader.dataset.data_prefix = dict(
        img_path=f'coco/{split}2017')
    cfg.model.tasks = _task_models(cfg)
    return cfg


def probe_cfg(task: str, row: str, preset: dict) -> Config:
    """Downstream probe config of ``task`` (``'det'`` / ``'seg'``) on the
    cached features of table row ``row``."""
    key = f'probe_{task}'
    cfg = load_cfg(key)
    p = preset[key]
    _set_schedule(cfg, p['iters'], p['batch'], p.get('lr'))
    features = f'features_{row}/features.safetensors'
    # the probe's neck takes the row's channels (e.g. a teacher's FPN)
    from safetensors import safe_open
    with safe_open(features, framework='pt') as f:
        cfg.model.neck.in_channels = [
            f.get_slice(f'train.level{lv}').get_shape()[1]
            for lv in range(len(cfg.model.neck.in_channels))]
    for loader in (cfg.train_dataloader, cfg.test_dataloader):
        for t in loader.dataset.pipeline:
            if t['type'] == 'kiv_demo.AttachFeatures':
                t['file'] = features
    return cfg


def keep_test_outputs(cfg: Config, task: str, out_dir: str) -> None:
    """Make the test evaluator of a ``'det'`` / ``'seg'`` config keep what
    the intervals are computed from, in place: mmdet's ``CocoMetric``
    results files (``<out_dir>/results.{bbox,segm}.json``) or the per-image
    areas of ``kiv_demo.IoUMetricWithSamples`` (``<out_dir>/samples.npz``)."""
    if task == 'det':
        cfg.test_evaluator.outfile_prefix = osp.join(out_dir, 'results')
    else:
        cfg.test_evaluator = dict(
            type='kiv_demo.IoUMetricWithSamples', iou_metrics=['mIoU'],
            samples_file=osp.join(out_dir, 'samples.npz'))


def interval_table(task: str, out_dir: str, seed: int) -> dict:
    """Box / mask AP (``'det'``) or mIoU (``'seg'``) with their 95 %
    bootstrap intervals over the validation scenes, from the outputs kept
    by :func:`keep_test_outputs`.

    Returns:
        dict: metric -> ``(value, low, high)``.
    """
    from .probes import coco_bootstrap, miou_bootstrap
    if task == 'det':
        gt = 'world/coco/annotations/instances_val2017.json'
        return {f'{kind}_ap': coco_bootstrap(
            gt, osp.join(out_dir, f'results.{iou}.json'), iou, seed=seed)
            for kind, iou in (('box', 'bbox'), ('mask', 'segm'))}
    return dict(miou=miou_bootstrap(osp.join(out_dir, 'samples.npz'),
                                    seed=seed))


def effnet_teacher(preset: dict, world_head: bool = True) -> torch.nn.Module:
    """EfficientNet-Lite0 as the demo's ``kiv.Teacher`` (its input size and
    normalisation), in eval mode.

    Args:
        preset (dict): the run's sizes.
        world_head (bool): the classification teacher (the inheritance
            config's: ``_fc`` = the world classifier of ``teacher_cls``);
            else the knowledge base's (ImageNet weights and classifier).
    """
    from kiv.registry import MODELS
    cfg = inherit_cfg('inherit', preset) if world_head else \
        knowledge_base_cfg(preset)
    return MODELS.build(cfg.model.teachers.effnet).eval()
