"""The ``make demo`` pipeline: inherit a small foundation model on CPU.

Stages (all cached, see :mod:`kiv_demo.stages`; two run at once):

1. ``world``: the procedural multi-task world in the COCO / ADE20K /
   ImageNet layouts with three labelled splits (``teachers``: the teachers'
   data; ``train``: the user's small labelled split; ``val``), the user's
   unlabelled scenes and real-photo crops (train / held out), the list of
   the user's images and a link to EfficientNet-Lite0's ImageNet weights.
2. ``kb_cache``, ``knowledge_base``: EfficientNet-Lite0 cached on views of
   the user's images; a DINOv2-like ViT distilled from it
   (``kiv_demo.PlainViTStudent``): the knowledge base standing in for
   DINOv2.
3. ``teacher_det`` / ``teacher_seg`` / ``teacher_cls``: Mask R-CNN (mmdet),
   Semantic FPN (mmseg) and a world classifier on EfficientNet-Lite0,
   trained on the teachers' split: the purpose-specific teachers.
4. ``teacher_cache``: every teacher of the inheritance run (the knowledge
   base included) once over ``K`` seeded views of every user image.
5. ``inherit``: knowledge inheritance with ``kiv.KnowledgeInheritance``
   (frozen knowledge base + zero-initialised ``kiv.AdapterViT``, shared
   latent space, four teachers, multi-task heads on the labelled views of
   each batch), exported with ``export_student``. ``--full`` adds the
   ablations (:data:`VARIANTS`).
6. ``rival_user`` / ``rival_teachers``: the same architecture from scratch,
   multi-task on the user's labelled split / the teachers' split, with the
   inheritance run's steps and labelled views per step.
7. ``kb_alone``: the knowledge base with the adapter's gates closed (its
   own summary and maps).
8. ``effnet_eval``: the classification teacher on the agreement images.
9. ``features_<row>``: each frozen backbone's features, computed once.
10. ``probe_{cls,det,seg}_<row>``: logistic regression + k-NN, Mask R-CNN
    (mmdet ``CocoMetric``) and Semantic FPN (mmseg ``IoUMetric``) on the
    frozen features, trained on the user's labelled split, the same for
    every row (``--check-probes``: also on a strong and a weak backbone,
    and at twice the steps).
11. ``agreement_<row>``: the inherited heads against the ground truth and
    against their teachers.
12. ``trivial``: the majority-class baselines of every metric.
13. ``report``: tables with 95 % bootstrap intervals, budgets, figures.
"""
from __future__ import annotations

import copy
import os.path as osp
from typing import Any, Callable

from .eval_stages import (stage_agreement, stage_effnet_eval, stage_features,
                          stage_probe, stage_probe_cls, stage_report,
                          stage_trivial)
from .presets import get_preset
from .recipes import (CACHE, CONFIG_DIR, CONFIGS, KB_CACHE, ROWS, VARIANTS,
                      _config_files, dense_space, inherit_cfg,
                      probe_backbone_cfg)
from .stages import Stage, StageContext, run_stages
from .world import HELDOUT_PHOTOS, TRAIN_PHOTOS
from .train_stages import (stage_inherit, stage_kb_alone,
                           stage_knowledge_base, stage_rival, stage_teacher,
                           stage_teacher_cache, stage_teacher_cls,
                           stage_world)

__all__ = ['build_stages', 'build_tuning_stages', 'run_demo', 'ROWS',
           'VARIANTS', 'CONFIG_DIR', 'inherit_cfg', 'probe_backbone_cfg']


# --------------------------------------------------------------- assembly --
def _units(preset: dict, key: str) -> int:
    return preset[key]['iters'] * preset[key]['batch']


def _views(preset: dict) -> int:
    world = preset['world']
    distill = world['num_train'] + world['num_unlabelled'] + \
        world['photo_crops'] * len(TRAIN_PHOTOS)
    return distill * preset['cache']['views']


def _agreement_images(preset: dict) -> int:
    """The classification teacher's agreement images (``effnet_eval``):
    new views of the user's images and the held-out photo crops."""
    return preset['agreement_views'] + \
        preset['world']['heldout_crops'] * len(HELDOUT_PHOTOS)


def _core_stages(preset: dict) -> list[Stage]:
    """World, teachers, caches and knowledge base."""
    cost = preset['cost']
    world = preset['world']
    n_img = world['num_train'] * 2 + world['num_val'] + \
        world['num_teachers'] + world['num_unlabelled']
    # the knowledge base's chain first: it is the longest path to the
    # inheritance run (stages start in this order when two run at once)
    return [
        Stage('world', 'procedural world (COCO/ADE20K/ImageNet layouts: the '
              'teachers\' split, the user\'s labelled split, validation) + '
              'the user\'s unlabelled scenes and photo crops',
              stage_world(preset), params=dict(world=world),
              cost=3 + 0.003 * n_img),
        Stage(KB_CACHE, 'teacher-feature cache of the knowledge base: '
              'EfficientNet-Lite0 on every view of the user\'s images',
              stage_teacher_cache(preset, KB_CACHE), deps=('world', ),
              params=dict(preset['cache'], effnet=preset['effnet_size']),
              files=_config_files(CONFIGS['knowledge_base']),
              cost=5 + _views(preset) * cost['effnet']),
        Stage('teacher_det', 'detection teacher: Mask R-CNN, EfficientNet-'
              'Lite0 + FPN, on the teachers\' split (mmdet)',
              stage_teacher('teacher_det', preset), deps=('world', ),
              params=dict(preset['teacher_det']),
              files=_config_files(CONFIGS['teacher_det']),
              cost=10 + _units(preset, 'teacher_det') * cost['det_train']),
        Stage('knowledge_base', 'knowledge base: DINOv2-like ViT distilled '
              'from EfficientNet-Lite0 (cached)',
              stage_knowledge_base(preset), deps=('world', KB_CACHE),
              params=dict(preset['knowledge_base'],
                          effnet=preset['effnet_size']),
              files=_config_files(CONFIGS['knowledge_base']),
              cost=5 + _views(preset) * cost['load'] +
              _units(preset, 'knowledge_base') * cost['kb_train']),
        Stage('teacher_seg', 'segmentation teacher: Semantic FPN, '
              'EfficientNet-Lite0, on the teachers\' split (mmseg)',
              stage_teacher('teacher_seg', preset), deps=('world', ),
              params=dict(preset['teacher_seg']),
              files=_config_files(CONFIGS['teacher_seg']),
              cost=5 + _units(preset, 'teacher_seg') * cost['seg_train']),
        Stage('teacher_cls', 'classification teacher: EfficientNet-Lite0 + '
              'a world classifier fitted on the teachers\' split',
              stage_teacher_cls(preset), deps=('world', ),
              params=dict(effnet=preset['effnet_size']),
              files=_config_files(CONFIGS['knowledge_base'],
                                  CONFIGS['inherit']),
              cost=3 + cost['cls_fit'] + (
                  world['num_teachers'] + world['num_val'] +
                  world['num_val_cls']) * cost['effnet']),
        Stage(CACHE, 'teacher-feature cache of the inheritance: knowledge '
              'base, classifier, detector, segmenter on every view',
              stage_teacher_cache(preset, CACHE),
              deps=('world', KB_CACHE, 'teacher_det', 'teacher_seg',
                    'teacher_cls', 'knowledge_base'),
              params=dict(preset['cache'], effnet=preset['effnet_size']),
              files=_config_files(CONFIGS['knowledge_base'],
                                  CONFIGS['inherit']),
              cost=5 + _views(preset) * (cost['teachers'] + cost['load'])),
    ]


def _inherit_stage(name: str, variant: str, preset: dict,
                   title: str) -> Stage:
    cost = preset['cost']
    return Stage(
        name, 'knowledge inheritance: ' + title,
        stage_inherit(variant, preset),
        deps=('world', 'teacher_det', 'teacher_seg', 'teacher_cls', CACHE,
              'knowledge_base'),
        params=dict(preset['inherit'], effnet=preset['effnet_size'],
                    variant=variant),
        files=_config_files(CONFIGS['inherit'], CONFIGS['probe_det'],
                            CONFIGS['probe_seg']),
        cost=10 + _views(preset) * cost['load'] +
        _units(preset, 'inherit') * cost['inherit_train'])


def _rival_stage(name: str, preset: dict, row: str | None = None) -> Stage:
    """A data-centric row (``row``, default ``name``)."""
    row = row or name
    p = preset['inherit']
    return Stage(
        name, ROWS[row], stage_rival(row, preset), deps=('world', ),
        params=dict(iters=p['iters'], labelled=p['labelled'],
                    **preset.get('rival', {})),
        files=_config_files(CONFIGS['rival'], CONFIGS['probe_det'],
                            CONFIGS['probe_seg']),
        cost=5 + p['iters'] * p['labelled'] * preset['cost'][
            'rival_train'])


def _probe_stages(row: str, title: str, preset: dict,
                  tasks: tuple[str, ...] = ('cls', 'det', 'seg'),
                  features: bool = True, suffix: str = '',
                  feature_deps: tuple[str, ...] | None = None,
                  space: str | None = None) -> list[Stage]:
    """Features of a row's frozen backbone and its probes (stage names
    ``probe_<task><suffix>_<row>``), trained on the user's labelled split.

    ``feature_deps``: the stages the backbone comes from (default: the
    stage ``row`` itself). ``space``: what the det / seg probes read
    (default :func:`~kiv_demo.recipes.dense_space` of ``row``).
    """
    space = dense_space(row) if space is None else space
    world = preset['world']
    n_img = world['num_train'] * 2 + world['num_val'] + world['num_val_cls']
    deps = (row, ) if feature_deps is None else tuple(feature_deps)
    stages = [Stage(f'features_{row}', f'frozen features of: {title}',
                    stage_features(row, preset),
                    deps=('world', *deps), params=dict(dense=space),
                    files=_config_files(CONFIGS['inherit']),
                    cost=2 + n_img * preset['cost']['features'])
              ] if features else []
    for task in tasks:
        if task == 'cls':
            stages.append(Stage(
                f'probe_cls_{row}', f'logistic regression + k-NN of: '
                f'{title}', stage_probe_cls(row),
                deps=('world', f'features_{row}'), cost=5))
            continue
        key = f'probe_{task}'
        stages.append(Stage(
            f'{key}{suffix}_{row}', f'{task} probe{suffix} of: {title}',
            stage_probe(task, row, preset),
            deps=('world', f'features_{row}'),
            params=dict(preset[key], row=row),
            files=_config_files(CONFIGS[key]),
            cost=5 + _units(preset, key) * preset['cost'][f'{task}_probe']))
    return stages


def build_stages(preset_name: str,
                 probe_check: bool = False) -> list[Stage]:
    """The demo's stages for a preset (a name of
    :data:`~kiv_demo.presets.PRESETS`); ``probe_check`` adds the probes at
    twice the steps and the probe check (the det / seg probes on a strong
    and a weak backbone)."""
    preset = get_preset(preset_name)
    preset['probe_check'] = probe_check
    cost = preset['cost']
    world = preset['world']
    stages = _core_stages(preset)
    variants = ['inherit'] + (list(VARIANTS[1:]) if preset['ablations']
                              else [])
    for v in variants:
        stages.append(_inherit_stage(v, v, preset, ROWS[v]))
    rivals = ['rival_user'] + (['rival_teachers']
                               if preset['rival_teachers_row'] else [])
    for row in rivals:
        stages.append(_rival_stage(row, preset))
    stages.append(Stage(
        'kb_alone', ROWS['kb_alone'], stage_kb_alone(preset),
        deps=('knowledge_base', 'teacher_cls'),
        files=_config_files(CONFIGS['inherit']), cost=2))
    stages.append(Stage(
        'effnet_eval', 'the classification teacher on the agreement images',
        stage_effnet_eval(preset), deps=('world', 'teacher_cls', CACHE),
        params=dict(views=preset['agreement_views'],
                    effnet=preset['effnet_size']),
        files=_config_files(CONFIGS['inherit']),
        cost=3 + _agreement_images(preset) * cost['effnet']))
    rows = ['inherit', *rivals] + (
        ['kb_alone'] if preset['kb_alone_row'] else []) + variants[1:]
    for row in rows:
        stages += _probe_stages(row, ROWS[row], preset)
    distilled = ['knowledge_base'] + variants
    # the classifier's agreement images: validation scenes, new views of
    # the user's images, held-out photo crops
    cls_images = world['num_val'] + world['num_val_cls'] + \
        _agreement_images(preset)
    for row in distilled:
        stages.append(Stage(
            f'agreement_{row}', f'inherited heads vs their teachers and the '
            f'ground truth: {row}',
            stage_agreement(row, preset),
            deps=('world', 'teacher_det', 'teacher_seg', 'teacher_cls',
                  'effnet_eval', row),
            params=dict(effnet=preset['effnet_size']),
            files=_config_files(CONFIGS['inherit'],
                                CONFIGS['knowledge_base']),
            cost=8 + cls_images * cost['features'] +
            (world['num_val'] * cost['agreement_dense']
             if row != 'knowledge_base' else 0)))
    if preset.get('probe_check'):
        # the det / seg probes of the main rows again with twice the
        # steps: does any row change rank? (reported in report/verdict.md)
        double = copy.deepcopy(preset)
        for key in ('probe_det', 'probe_seg'):
            double[key]['iters'] *= 2
        for row in rows[:3]:
            stages += _probe_stages(row, ROWS[row], double, ('det', 'seg'),
                                    features=False, suffix='_x2')
        # can the probes tell a strong backbone from a weak one at all?
        # (the detection teacher's own pyramid vs random weights)
        for row, deps in (('check_strong', ('teacher_det', )),
                          ('check_weak', ())):
            stages += _probe_stages(row, ROWS[row], preset, ('det', 'seg'),
                                    feature_deps=deps)
    stages.append(Stage('trivial', 'majority-class baselines of every metric',
                        stage_trivial(preset), deps=('world', ), cost=5))
    stages.append(Stage(
        'report', 'tables with 95 % intervals, figures',
        stage_report(rows, distilled, preset),
        deps=tuple(s.name for s in stages),
        params=dict(rows=rows, pca=preset['pca_images']), cost=20))
    return stages


#: learning rates tried for the inherited student and the data-centric
#: rival on the user's data
TUNE_LRS = (1e-3, 2e-3, 4e-3, 8e-3)


def stage_tune_report(names: dict[str, tuple[str, float]]
                      ) -> Callable[[StageContext], dict]:
    """Table of the sweep and the best learning rate of each side."""

    def run(ctx: StageContext) -> dict:
        rows, best = [], {}
        for name, (kind, lr) in names.items():
            cls = ctx.results[f'probe_cls_{name}']['table']['top1_logreg']
            seg = ctx.results[f'probe_seg_{name}']['table']['miou']
            score = (cls[0] + seg[0]) / 2
            rows.append(dict(kind=kind, lr=lr, top1_logreg=cls, miou=seg,
                             score=score))
            if kind not in best or score > best[kind]['score']:
                best[kind] = dict(lr=lr, score=score)
        lines = ['| run | lr | top-1 logreg (%) | mIoU | mean |',
                 '|---|---:|---:|---:|---:|']
        for r in rows:
            lines.append(f"| {r['kind']} | {r['lr']:g} | "
                         f"{r['top1_logreg'][0]:.1f} | {r['miou'][0]:.1f} | "
                         f"{r['score']:.1f} |")
        md = '\n'.join(lines)
        with open(osp.join(ctx.dir, 'tuning.md'), 'w',
                  encoding='utf-8') as f:
            f.write(md + '\n')
        return dict(rows=rows, best=best, markdown=md)

    return run


def build_tuning_stages(preset_name: str,
                        lrs: tuple[float, ...] = TUNE_LRS) -> list[Stage]:
    """Learning-rate sweep of the inherited student and the data-centric
    rival on the user's data (``rival_user``), the
    same grid and the same selection rule for both.

    Run on a world of its own (``tools/demo.py --tune`` uses another seed:
    other training scenes and other held-out scenes): the demo's
    validation scenes are never used to choose hyper-parameters. Each run
    is scored by its frozen-backbone probes on the tuning world's held-out
    scenes (mean of logistic-regression top-1 and Semantic FPN mIoU; the
    Mask R-CNN probe is left out to keep the sweep short).
    """
    preset = get_preset(preset_name)
    stages = _core_stages(preset)
    names: dict[str, tuple[str, float]] = {}
    for lr in lrs:
        for kind in ('inherit', 'rival'):
            p = copy.deepcopy(preset)
            p.setdefault(kind, {})['lr'] = lr
            name = f'{kind}_lr{lr:g}'
            names[name] = (kind, lr)
            stages.append(_inherit_stage(name, 'inherit', p, f'lr {lr:g}')
                          if kind == 'inherit' else
                          _rival_stage(name, p, 'rival_user'))
            # probed as the table probes the row it tunes
            stages += _probe_stages(
                name, f'{kind} lr {lr:g}', p, tasks=('cls', 'seg'),
                space=dense_space('inherit' if kind == 'inherit'
                                  else 'rival_user'))
    stages.append(Stage('tune_report', 'learning-rate sweep table',
                        stage_tune_report(names),
                        deps=tuple(s.name for s in stages), cost=1))
    return stages


def run_demo(preset_name: str, work_dir: str, seed: int = 0,
             fresh: bool = False, stream=None,
             salt: dict | None = None,
             probe_check: bool = False, jobs: int = 1,
             threads: int | None = None) -> dict[str, Any]:
    """Run the demo.

    Args:
        preset_name (str): ``toy``, ``quick``, ``default`` or ``full``.
        work_dir (str): where everything goes.
        seed (int): the run's seed.
        fresh (bool): ignore finished stages.
        stream: progress output. Defaults to stdout.
        salt (dict, optional): run settings that change the numbers without
            being stage parameters (thread count, kernel choice): part of
            every stage's fingerprint, so a run with other settings does not
            reuse stages computed with these.
        probe_check (bool): also run every det / seg probe with twice the
            steps and report whether the ranking of the rows changes.
        jobs (int): stages run at once (forked processes), see
            :func:`~kiv_demo.stages.run_stages`.
        threads (int, optional): torch threads of each forked stage.

    Returns:
        dict: every stage's result (see :func:`~kiv_demo.stages.run_stages`).
    """
    stages = build_stages(preset_name, probe_check)
    if salt:
        for stage in stages:
            stage.params = dict(stage.params, _run=dict(salt))
    return run_stages(stages, work_dir, seed, fresh=fresh, stream=stream,
                      jobs=jobs, threads=threads)
