"""Evaluation stages of the demo: frozen features, the probes, the
teacher's own outputs, the inherited heads against their teachers, the
image-blind baselines and the report.

Each ``stage_*`` returns the ``run(ctx)`` of a :class:`~kiv_demo.stages.Stage`.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import os.path as osp
from typing import Any, Callable

import numpy as np
import torch
from mmengine.config import Config

from kiv.structures import FeatureOutput

from .recipes import (CACHE, CLASSES, _last_checkpoint, effnet_teacher,
                      inherit_cfg, interval_table, keep_test_outputs,
                      knowledge_base_cfg, probe_backbone_cfg, probe_cfg,
                      run_runner)
from .stages import StageContext
from .world import world_labels

__all__ = ['stage_features', 'stage_probe_cls', 'stage_probe',
           'stage_effnet_eval', 'stage_agreement', 'stage_trivial',
           'stage_report']


def stage_features(row: str, preset: dict) -> Callable[[StageContext], dict]:
    """Frozen-backbone features of a row: world train (+ flipped), val
    and the classification validation scenes (summaries).

    What the dense maps are is the stage's fingerprinted parameter
    ``dense`` (``'student'`` or a teacher's name, see
    :func:`~kiv_demo.recipes.probe_backbone_cfg`), read from the stage
    itself so the fingerprint and the features cannot disagree.
    """

    def run(ctx: StageContext) -> dict:
        from .probes import extract_features, save_features
        from .world import world_cls_only_images, world_images
        backbone = _probe_backbone(row, preset, ctx.seed,
                                   ctx.stage.params['dense'])
        # (name, images, flipped, pyramid levels kept); ``val_cls``: the
        # classification-only validation scenes, summaries only
        train = world_images('world', 'train')
        sets = [('train', train, False, 4), ('train_flip', train, True, 4),
                ('val', world_images('world', 'val'), False, 4),
                ('val_cls', world_cls_only_images('world'), False, 0)]
        tensors = {}
        for i, (name, paths, flip, levels) in enumerate(sets):

            def progress(done, total, i=i, name=name):
                ctx.progress.update((i + done / total) / len(sets),
                                    f'features {name} {done}/{total}')

            feats = extract_features(backbone, paths, flip=flip,
                                     levels=levels, progress=progress)
            for key, value in feats.items():
                if not (name == 'train_flip' and key == 'summary'):
                    tensors[f'{name}.{key}'] = value
        # every classification validation scene, in the labels' order:
        # those of ``val`` first
        tensors['val_cls.summary'] = torch.cat(
            [tensors['val.summary'], tensors.get(
                'val_cls.summary', tensors['val.summary'][:0])])
        save_features(osp.join(ctx.dir, 'features.safetensors'), tensors)
        return dict(keys=len(tensors))

    return run


class _TeacherPyramid(torch.nn.Module):
    """A ``kiv.Teacher``'s dense maps as a probe backbone: takes the
    ImageNet-normalised images :func:`~kiv_demo.probes.extract_features`
    gives, returns the teacher's own pyramid (its own resize and
    normalisation) and its last level's mean as the summary."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def forward_features(self, x: torch.Tensor):
        from kiv.structures import FeatureOutput
        from .probes import IMAGENET_MEAN, IMAGENET_STD
        rgb = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + \
            torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        feats = self.teacher(rgb).features
        return FeatureOutput(summary=feats[-1].mean((2, 3)), features=feats)


def _probe_backbone(row: str, preset: dict, seed: int,
                    space: str | None = None) -> torch.nn.Module:
    """The frozen backbone whose features a row's probes train on.

    ``check_strong``: the detection teacher's own backbone + FPN (trained
    on the teachers' split); ``check_weak``: the rows' architecture with
    random weights (drawn with the run's ``seed``); any other row: its
    exported ``student.pth``.
    """
    from mmengine.runner import set_random_seed

    from kiv.registry import MODELS
    if row == 'check_strong':
        cfg = inherit_cfg('inherit', preset)
        return _TeacherPyramid(MODELS.build(cfg.model.teachers.det)).eval()
    if row == 'check_weak':
        student = copy.deepcopy(inherit_cfg('inherit', preset).model.student)
        student.base.checkpoint = None
        student.update(out_type='both', freeze_base=True, frozen_stages=5)
        set_random_seed(seed)
        backbone = MODELS.build(student)
        backbone.init_weights()
        return backbone.eval()
    backbone = MODELS.build(probe_backbone_cfg(row, space))
    backbone.init_weights()
    return backbone


def _cls_table(probe: dict, labels: list[int], seed: int) -> dict:
    from .probes import bootstrap_ci
    out = {}
    for key in ('logreg', 'knn'):
        pred = probe[f'{key}_pred']
        correct = [100.0 * (p == y) for p, y in zip(pred, labels)]
        out[f'top1_{key}'] = bootstrap_ci(correct, seed=seed)
    return out


def stage_probe_cls(row: str) -> Callable[[StageContext], dict]:
    """Logistic regression + k-NN on a row's summaries, fitted on the
    user's labelled split."""

    def run(ctx: StageContext) -> dict:
        from .probes import cls_probe, load_tensor
        path = f'features_{row}/features.safetensors'
        train_x, val_x = (load_tensor(path, k)
                          for k in ('train.summary', 'val_cls.summary'))
        train_y = torch.tensor(world_labels('world', 'train'))
        val_y = world_labels('world', 'val')
        probe = cls_probe(train_x, train_y, val_x, len(CLASSES),
                          seed=ctx.seed)
        return dict(table=_cls_table(probe, val_y, ctx.seed),
                    weight_decay=probe['weight_decay'], k=probe['k'],
                    cv_logreg=probe['cv_logreg'], cv_knn=probe['cv_knn'])

    return run


def stage_probe(task: str, row: str,
                preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        cfg = probe_cfg(task, row, preset)
        keep_test_outputs(cfg, task, ctx.dir)
        _, metrics = run_runner(cfg, ctx)
        table = interval_table(task, ctx.dir, ctx.seed)
        return dict(metrics=metrics, table=table)

    return run


def stage_effnet_eval(preset: dict) -> Callable[[StageContext], dict]:
    """The classification teacher (EfficientNet-Lite0 + the world
    classifier) once on the agreement images: the world's classification
    validation scenes (``teacher_cls`` ran it on them), new views of the
    user's images and held-out photo crops (pooled summary, logits), and
    its head on the mean summary of the cached views."""

    def run(ctx: StageContext) -> dict:
        import cv2

        from kiv.datasets.teacher_cache import (ReplayView, load_statistics,
                                                read_index, view_rng)
        from .probes import load_rgb, load_tensor, save_features
        from .world import world_cls_images
        teacher = effnet_teacher(preset)
        with open('world/distill.txt', encoding='utf-8') as f:
            distill = [line.strip() for line in f if line.strip()]
        # new views of distillation images (another seed than the cache's)
        view = ReplayView(**{k: v for k, v in
                             read_index(CACHE)['view'].items()
                             if k != 'type'})
        rng = np.random.default_rng(ctx.seed + 7919)
        picks = rng.choice(len(distill),
                           min(preset['agreement_views'], len(distill)),
                           replace=False)
        os.makedirs(osp.join(ctx.dir, 'views'), exist_ok=True)
        view_paths = []
        for k, i in enumerate(sorted(picks.tolist())):
            img = cv2.imread(osp.join('world', distill[i]))
            params = view.sample(img.shape[:2],
                                 view_rng(ctx.seed + 7919, i, 0))
            path = osp.join(ctx.dir, 'views', f'{k:05d}.png')
            cv2.imwrite(path, view.apply(img, params))
            view_paths.append(path)
        sets = dict(val=world_cls_images('world', 'val'), views=view_paths,
                    photos=sorted(glob.glob('world/photos/heldout/*.jpg')))
        out = {f'val.{k}': load_tensor('teacher_cls/val_outputs.safetensors',
                                       f'val.{k}')
               for k in ('summary', 'logits')}
        total = len(sets['views']) + len(sets['photos'])
        done = 0
        with torch.no_grad():
            for name in ('views', 'photos'):
                paths = sets[name]
                summaries, logits = [], []
                for start in range(0, len(paths), 64):
                    x = load_rgb(paths[start:start + 64])
                    s = teacher(x).summary
                    summaries.append(s)
                    logits.append(teacher.forward_head(s))
                    done += len(x)
                    ctx.progress.update(done / total,
                                        f'classification teacher '
                                        f'{done}/{total}')
                out[f'{name}.summary'] = torch.cat(summaries)
                out[f'{name}.logits'] = torch.cat(logits)
            index = read_index(CACHE)
            sums = load_statistics(osp.join(CACHE, 'statistics.safetensors'),
                                   index['cache_id'])['effnet.summary']
            dim = out['val.summary'].shape[1]
            mean = (sums[1:1 + dim] / sums[0]).float()[None]
            out['mean.summary'] = mean
            out['mean.logits'] = teacher.forward_head(mean)
        save_features(osp.join(ctx.dir, 'outputs.safetensors'), out)
        with open(osp.join(ctx.dir, 'sets.json'), 'w', encoding='utf-8') as f:
            json.dump(sets, f, indent=1)
        return {k: len(v) for k, v in sets.items()}

    return run


def _row_cfg(row: str, preset: dict) -> tuple[Config, str]:
    """The training config and last checkpoint of a distilled row."""
    if row == 'knowledge_base':
        return (knowledge_base_cfg(preset), _last_checkpoint(
            row, preset['knowledge_base']['iters']))
    return inherit_cfg(row, preset), _last_checkpoint(
        row, preset['inherit']['iters'])


def _outputs(out: FeatureOutput) -> list[torch.Tensor]:
    """A teacher-shaped output as a list: its summary (if any), then its
    levels (what :class:`~kiv_demo.agreement.Calibration` takes)."""
    return ([] if out.summary is None else [out.summary]) + list(out.features)


def stage_agreement(row: str,
                    preset: dict) -> Callable[[StageContext], dict]:
    """The inherited heads of a distilled row against their teachers and
    the ground truth, plain and, for a run with kiv's label-free
    calibration (``kiv.InheritedCalibrationHook``), calibrated."""

    def run(ctx: StageContext) -> dict:
        from .agreement import (cls_agreement, det_agreement,
                                inherited_outputs, load_distiller,
                                seg_agreement, seg_vs_ground_truth,
                                teacher_sizes, trivial_cls_agreement)
        from .probes import bootstrap_ci, load_rgb, load_tensor
        from .world import world_cls_only_images, world_images
        cfg, ckpt = _row_cfg(row, preset)
        model = load_distiller(cfg, ckpt)
        outputs = 'effnet_eval/outputs.safetensors'
        with open('effnet_eval/sets.json', encoding='utf-8') as f:
            sets = json.load(f)
        effnet = model.teachers['effnet']
        names = [n for n in ('effnet', 'seg', 'det') if n in model.teachers]
        sizes = {n: teacher_sizes(model.teachers[n], (64, 64))
                 for n in names}

        def inherited(x: torch.Tensor, teachers: list[str]) -> dict:
            """Inherited outputs of ``teachers`` on ``x`` (batches of 64,
            concatenated): name -> [summary (if any), *levels]."""
            parts = [inherited_outputs(model, x[s:s + 64], teachers, sizes)
                     for s in range(0, len(x), 64)]
            return {n: _outputs(FeatureOutput(
                None if parts[0][n].summary is None else
                torch.cat([q[n].summary for q in parts]),
                tuple(torch.cat(level) for level in zip(
                    *[q[n].features for q in parts])))) for n in teachers}

        # the classification teacher's world classifier: the inheritance
        # runs' own ``effnet`` teacher; the knowledge base was distilled from
        # the same EfficientNet-Lite0 features with ImageNet's classifier,
        # so its inherited summary gets the world one
        world_head = (effnet_teacher(preset) if row == 'knowledge_base'
                      else effnet).forward_head
        mean_logits = load_tensor(outputs, 'mean.logits')[0]
        # kiv's label-free calibration, measured after the run's last step
        calibrated = model.latent.calibration_ready
        # ``dense_val``: the detection / segmentation validation scenes
        # (COCO / ADE20K val), the first classification ones; the student
        # runs once on them for the classifier and the segmenter, and on
        # the classification-only scenes for the classifier alone
        images = {name: load_rgb(sets[name], 64)
                  for name in ('views', 'photos')}
        dense_val = load_rgb(world_images('world', 'val'), 64)
        val_out = inherited(dense_val, [n for n in names if n != 'det'])
        cls_out = val_out['effnet']
        extra = world_cls_only_images('world')
        if extra:
            cls_out = [torch.cat(parts) for parts in zip(cls_out, inherited(
                load_rgb(extra, 64), ['effnet'])['effnet'])]
        refs, got = {}, {}
        for i, name in enumerate(('views', 'val', 'photos')):
            refs[name] = load_tensor(outputs, f'{name}.logits')
            summary = cls_out[0] if name == 'val' else \
                inherited(images[name], ['effnet'])['effnet'][0]
            got[name] = world_head(summary)
            ctx.progress.update((i + 1) / 5, f'classifier agreement {name}')
        # in distribution: new views of distillation images + world val
        refs['in_dist'] = torch.cat([refs['views'], refs['val']])
        got['in_dist'] = torch.cat([got['views'], got['val']])
        result: dict[str, Any] = dict(
            cls={k: cls_agreement(refs[k], got[k], ctx.seed) for k in refs},
            trivial={k: trivial_cls_agreement(refs[k], mean_logits, ctx.seed)
                     for k in refs})
        # against the ground truth: the inherited classifier (plain and
        # calibrated) and its teacher
        labels = world_labels('world', 'val')
        heads = [('inherited', got['val']), ('teacher', refs['val'])]
        if calibrated:
            heads.append(('inherited_calibrated', world_head(
                model.latent.calibrate(FeatureOutput(
                    cls_out[0], tuple(cls_out[1:])), 'effnet').summary)))
        result['gt'] = {
            f'{who}_top1': bootstrap_ci(
                [100.0 * (int(p) == y)
                 for p, y in zip(logits.argmax(1), labels)], seed=ctx.seed)
            for who, logits in heads}
        if 'seg' in model.teachers:
            seg = model.teachers['seg']
            ref = torch.cat([seg(dense_val[s:s + 64]).features[0]
                             for s in range(0, len(dense_val), 64)])
            inh = val_out['seg'][0]
            result['seg'] = seg_agreement(
                ref, inh, osp.join(ctx.dir, 'seg_samples.npz'), ctx.seed)
            maps = sorted(glob.glob('world/ade/ADEChallengeData2016/'
                                    'annotations/validation/*.png'))
            runs = [('inherited', inh), ('teacher', ref)]
            if calibrated:
                runs.append(('inherited_calibrated', model.latent.calibrate(
                    FeatureOutput(None, (inh, )), 'seg').features[0]))
            for who, logits in runs:
                result['gt'][f'{who}_miou'] = seg_vs_ground_truth(
                    logits, maps, osp.join(ctx.dir, f'seg_gt_{who}.npz'),
                    ctx.seed)['miou']
        ctx.progress.update(0.7, 'segmenter agreement')
        if 'det' in model.teachers:
            from mmdet.registry import MODELS as DET_MODELS
            from mmengine.registry import DefaultScope

            from kiv.utils.state_dict import read_state_dict
            det_cfg = Config.fromfile('teacher_det/teacher_det.py')
            with DefaultScope.overwrite_default_scope('mmdet'):
                detector = DET_MODELS.build(det_cfg.model)
            detector.load_state_dict(
                read_state_dict('teacher_det/teacher_det.pth'))
            detector.eval()
            result['det'] = det_agreement(
                model, detector, dense_val, ctx.dir, CLASSES, seed=ctx.seed,
                progress=lambda d, t: ctx.progress.update(
                    0.7 + 0.3 * d / t, f'detector agreement {d}/{t}'),
                gt_file='world/coco/annotations/instances_val2017.json',
                calibrated=calibrated)
            for key, value in result['det'].pop('gt').items():
                result['gt'][f'inherited_{key}'] = value
        return result

    return run


def stage_trivial(preset: dict) -> Callable[[StageContext], dict]:
    """Image-blind baselines of every probe metric: the most frequent
    training class as the answer for every validation image (top-1), as
    one whole-image box / mask (AP) and for every pixel (mIoU)."""

    def run(ctx: StageContext) -> dict:
        import cv2
        from pycocotools import mask as mask_utils

        from .probes import bootstrap_ci, coco_bootstrap, miou_bootstrap
        train = world_labels('world', 'train')
        majority = int(np.bincount(train, minlength=len(CLASSES)).argmax())
        val = world_labels('world', 'val')
        top1 = bootstrap_ci([100.0 * (y == majority) for y in val],
                            seed=ctx.seed)
        # the most frequent foreground class of the training pixels
        pix = np.zeros(len(CLASSES) + 1)
        ade = 'world/ade/ADEChallengeData2016/annotations'
        for path in glob.glob(f'{ade}/training/*.png'):
            pix += np.bincount(cv2.imread(path, cv2.IMREAD_UNCHANGED).ravel(),
                               minlength=len(pix))[:len(pix)]
        seg_cls = int(pix[1:].argmax())
        val_maps = sorted(glob.glob(f'{ade}/validation/*.png'))
        areas = {k: [] for k in ('intersect', 'union', 'pred', 'label')}
        for path in val_maps:
            gt = cv2.imread(path, cv2.IMREAD_UNCHANGED).astype(int) - 1
            valid = gt >= 0
            inter, union = np.zeros(len(CLASSES)), np.zeros(len(CLASSES))
            label = np.bincount(gt[valid], minlength=len(CLASSES))
            pred = np.zeros(len(CLASSES))
            pred[seg_cls] = valid.sum()
            inter[seg_cls] = label[seg_cls]
            union = label + pred - inter
            for k, v in zip(areas, (inter, union, pred, label)):
                areas[k].append(v)
        np.savez(osp.join(ctx.dir, 'samples.npz'),
                 **{k: np.stack(v) for k, v in areas.items()})
        miou = miou_bootstrap(osp.join(ctx.dir, 'samples.npz'),
                              seed=ctx.seed)
        gt_file = 'world/coco/annotations/instances_val2017.json'
        with open(gt_file, encoding='utf-8') as f:
            images = json.load(f)['images']
        boxes, masks = [], []
        for im in images:
            w, h = im['width'], im['height']
            item = dict(image_id=im['id'], category_id=majority + 1,
                        score=1.0)
            boxes.append(dict(item, bbox=[0, 0, w, h]))
            rle = mask_utils.encode(np.asfortranarray(
                np.ones((h, w), np.uint8)))
            rle['counts'] = rle['counts'].decode('ascii')
            masks.append(dict(item, segmentation=rle))
        for name, res in (('bbox', boxes), ('segm', masks)):
            with open(osp.join(ctx.dir, f'results.{name}.json'), 'w',
                      encoding='utf-8') as f:
                json.dump(res, f)
        return dict(
            majority_class=CLASSES[majority], seg_class=CLASSES[seg_cls],
            table=dict(
                top1_logreg=top1, top1_knn=top1,
                box_ap=coco_bootstrap(gt_file, f'{ctx.dir}/results.bbox.json',
                                      'bbox', seed=ctx.seed),
                mask_ap=coco_bootstrap(gt_file,
                                       f'{ctx.dir}/results.segm.json',
                                       'segm', seed=ctx.seed),
                miou=miou))

    return run


def stage_report(rows: list[str], distilled: list[str],
                 preset: dict) -> Callable[[StageContext], dict]:

    def run(ctx: StageContext) -> dict:
        from .report import write_report
        return write_report(ctx.results, rows, distilled, preset, ctx)

    return run
